"""The demo's task, generated in code: name the first name of the person in a sentence.

Training and held-out rows use disjoint first names, so held-out accuracy measures a skill, not
memorised names. Every row carries the ground truth as ``reference``.
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
]

QUESTION = "Extract the first name from this sentence: {sentence}"


def split_names(seed: int = 0, held_out: float = 0.3) -> tuple[list[str], list[str]]:
    names = sorted(FIRST_NAMES)
    random.Random(seed).shuffle(names)
    k = int(len(names) * held_out)
    return names[k:], names[:k]


def make_rows(n: int, names: list[str], seed: int, prefix: str) -> list[dict]:
    """``n`` rows ``{"id", "prompt", "reference"}`` using only ``names`` as first names."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        first, last = rng.choice(names), rng.choice(LAST_NAMES)
        tpl = rng.randrange(len(TEMPLATES))
        key = (first, last, tpl)
        if key in seen:
            continue
        seen.add(key)
        sentence = TEMPLATES[tpl].format(name=f"{first} {last}")
        rows.append({"id": f"{prefix}-{len(rows):05d}", "prompt": QUESTION.format(sentence=sentence), "reference": first})
    return rows
