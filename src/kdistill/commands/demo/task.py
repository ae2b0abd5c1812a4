"""The demo's task, generated in code: name the first name of the person in a sentence.

What is held out is chosen so the held-out score measures a skill, not memory:

* **names**: held-out rows use first names never seen in training (every held-out row);
* **sentence templates** and **question phrasings**: the ``unseen_template`` group uses sentence
  templates and question phrasings that no training row uses; the ``seen_template`` group reuses the
  training templates and phrasings (with unseen names), so the report shows how far the skill
  generalizes beyond the training sentences.

Every row carries the ground truth (``reference``: the first name), its ``template`` and
``phrasing`` ids, and held-out rows their group as ``task`` (reported per group). A row is a chat:
one worked example (a few-shot turn, marked ``"train": false``: context, never trained on) and the
question. With it the teacher answers with the bare name far more often than without (measured:
the teacher's answers were sentences, mostly the input repeated, before the example was added).
"""

from __future__ import annotations

import random

FIRST_NAMES = """
Aaron Abigail Adam Adrian Aisha Alan Albert Alice Amara Amelia Andre Andrea Angela Anna Anton Arjun
Arthur Astrid Ava Barbara Beatrice Benjamin Bernard Bianca Boris Brian Bruno Camila Carl Carlos
Caroline Catherine Cecilia Charles Chloe Christina Clara Colin Daniel Daria David Deborah Diana
Diego Dmitri Dorothy Edgar Edith Eduardo Elena Elias Eliza Emil Emily Emma Enzo Eric Esther Ethan
Eva Felix Fiona Florence Francis Frank Freya Gabriel George Gloria Grace Gustav Hannah Harold
Harriet Hector Helen Henry Hugo Ian Ingrid Irene Isaac Isabel Ivan Jack Jacob James Jana Jasmine
Javier Jean Jessica Joan Joel John Jonas Jorge Joseph Julia Julian Karen Karim Kate Keith Kevin
Laila Laura Lena Leo Leon Liam Lily Linda Lionel Lucas Lucy Luis Luna Magnus Marco Margaret Maria
Marina Mark Martha Martin Mateo Maya Megan Michael Milan Mira Miriam Monica Nadia Naomi Nathan Nina
Noah Nora Olga Oliver Olivia Omar Oscar Pablo Patricia Paul Pedro Peter Philip Priya Rachel Rafael
Rahul Raymond Rebecca Ricardo Robert Rosa Ruby Ruth Samuel Sandra Sara Sebastian Simon Sofia Sophie
Stefan Stella Susan Tanya Teresa Thomas Tobias Tom Valentina Vera Victor Viktor Walter William
Xavier Yara Yusuf Zara Zoe
""".split()

LAST_NAMES = """
Anderson Baker Bauer Becker Bennett Brooks Carter Castro Chen Clarke Cohen Costa Cruz Dubois Evans
Fischer Fernandez Garcia Gomez Gray Green Hall Hansen Harris Hoffmann Hughes Ivanov Jensen Johnson
Kaur Keller Khan Kim Klein Kowalski Larsen Lee Lopez Martin Meyer Miller Moreau Morris Murphy Nguyen
Novak Olsen Park Patel Perez Petrov Price Reed Reyes Richter Rossi Russo Schmidt Silva Singh Smith
Suzuki Tanaka Taylor Torres Turner Walker Wang Weber Wilson Wright Young Zhang
""".split()

TEMPLATES = [
    "{name} bought a new bicycle at the market yesterday.",
    "Yesterday {name} finished painting the kitchen.",
    "The report was written by {name} last week.",
    "After the meeting, {name} walked to the train station.",
    "{name} has been teaching mathematics for ten years.",
    "Our new neighbour, {name}, plays the violin every evening.",
    "The package was delivered to {name} this morning.",
    "In the spring, {name} planted tomatoes in the garden.",
    "{name} won the chess tournament on Saturday.",
    "The museum guide today was {name}.",
    "Everyone applauded when {name} finished the speech.",
    "{name} called the bakery to order a cake.",
    "The keys were found by {name} under the sofa.",
    "Last summer {name} travelled across the country by train.",
    "{name} is the captain of the local football team.",
    "The letter from {name} arrived on Monday.",
    "According to the newspaper, {name} opened a small bookshop.",
    "The new manager, {name}, starts work next month.",
    "It was {name} who fixed the broken fence.",
    "Nobody expected {name} to arrive so early.",
    "{name} and her brother cooked dinner for twelve guests.",
    "The photo on the wall was taken by {name}.",
    "At noon {name} gave a short talk about bees.",
    "The best cake at the fair was baked by {name}.",
    "When the storm began, {name} closed all the windows.",
    "{name} repaired the old clock in the hallway.",
    "The winner of the poetry prize is {name}.",
    "On Friday the doctor, {name}, visited the school.",
    "{name} spent the whole afternoon reading in the park.",
    "The first customer of the day was {name}.",
    "My cousin {name} moved to a village near the sea.",
    "The song was recorded by {name} in a single day.",
    "Before sunrise, {name} went fishing on the lake.",
    "{name} lent me an umbrella when it started to rain.",
    "The team was led by {name} during the long project.",
    "Every Tuesday {name} volunteers at the animal shelter.",
    "The mystery was finally solved by {name}.",
    "{name} sold three paintings at the gallery.",
    "Thanks to {name}, the concert started on time.",
    "The map in the car belonged to {name}.",
]

PHRASINGS = [
    "Extract the full name from this sentence: {sentence}",
    "What is the name of the person in this sentence? {sentence}",
    "{sentence}\nWhat is the person's full name?",
    "Sentence: {sentence}\nName of the person?",
    "Read the sentence and give the person's name. {sentence}",
    "Which person is named in this sentence? {sentence}",
    "Give only the name mentioned here: {sentence}",
    "{sentence}\nWho is mentioned? Give the full name.",
]

# The worked example shown before every question (a name in neither list; a template in neither set).
EXAMPLE_SENTENCE, EXAMPLE_ANSWER = "The book was signed by Tariq Osei.", "Tariq Osei"

HELD_OUT_TEMPLATES = frozenset(range(3, len(TEMPLATES), 4))  # every 4th template: 10 of 40
HELD_OUT_PHRASINGS = frozenset({2, 5})  # 2 of 8


def split_names(seed: int = 0, held_out: float = 0.3) -> tuple[list[str], list[str]]:
    names = sorted(FIRST_NAMES)
    random.Random(seed).shuffle(names)
    k = int(len(names) * held_out)
    return names[k:], names[:k]


def conversation(sentence: str, phrasing: int) -> list[dict]:
    """The chat for one question: the worked example (context only) then the question."""
    ask = PHRASINGS[phrasing]
    return [
        {"role": "user", "content": ask.format(sentence=EXAMPLE_SENTENCE)},
        {"role": "assistant", "content": EXAMPLE_ANSWER, "train": False},
        {"role": "user", "content": ask.format(sentence=sentence)},
    ]


def make_rows(n: int, names: list[str], seed: int, prefix: str, seen_templates: bool = True,
              group: str | None = None) -> list[dict]:
    """``n`` rows ``{"id", "messages", "reference", "template", "phrasing"}`` using only ``names`` as
    first names, and the training templates and phrasings (``seen_templates``) or the held-out ones.
    ``group`` is written as the row's ``task`` (the report's per-group figures)."""
    rng = random.Random(seed)
    tpls = [i for i in range(len(TEMPLATES)) if (i in HELD_OUT_TEMPLATES) != seen_templates]
    phrs = [i for i in range(len(PHRASINGS)) if (i in HELD_OUT_PHRASINGS) != seen_templates]
    rows, seen = [], set()
    while len(rows) < n:
        first, last = rng.choice(names), rng.choice(LAST_NAMES)
        tpl, phr = rng.choice(tpls), rng.choice(phrs)
        key = (first, last, tpl, phr)
        if key in seen:
            continue
        seen.add(key)
        sentence = TEMPLATES[tpl].format(name=f"{first} {last}")
        row = {"id": f"{prefix}-{len(rows):05d}", "messages": conversation(sentence, phr), "reference": f"{first} {last}",
               "template": f"t{tpl:02d}", "phrasing": f"q{phr}"}
        if group is not None:
            row["task"] = group
        rows.append(row)
    return rows
