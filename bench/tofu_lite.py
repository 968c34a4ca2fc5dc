"""tofu-lite: a seeded, generated stand-in for TOFU (Maini et al. 2024,
arXiv 2401.06121), which cannot be downloaded here.

    python -m bench.tofu_lite --out DIR [--authors 20] [--seed 0]

Fictitious authors, each with :data:`QA_PER_AUTHOR` question/answer pairs
about invented facts. Every item carries TOFU's evaluation fields, as
open-unlearning reads them from ``*_perturbed`` splits:

* ``question``, ``answer``;
* ``paraphrased_answer``: the same facts in other words;
* ``perturbed_answer``: a list of 5 answers in the *same wording* as
  ``paraphrased_answer`` with the fact swapped for another value of the same
  type (another year, city, title...), so that truth ratios (perturbed vs
  paraphrased) compare facts and not phrasing;
* ``paraphrased_question``;

plus two fields of ours: ``author`` (the fictitious name) and ``key_spans``
(the substrings of ``answer`` that carry the fact, used by the leak rate,
extraction and redaction recall).

Splits, written as JSONL in DIR (names as TOFU's)::

    full.jsonl            forget + retain: what the target is fine-tuned on
    forget10.jsonl        10% of the authors (at least one)
    retain90.jsonl        the other trained authors
    retain_perturbed.jsonl  the first 3 retain authors per forget author: the
                          retain items an audit evaluates (TOFU's retain_perturbed
                          is likewise a subset)
    holdout10.jsonl       as many authors again, never trained on (MIA)
    real_authors.jsonl    who wrote famous books (model utility)
    world_facts.jsonl     real-world questions (model utility)
    manifest.json         seed, sizes and the sha256 of each file

Names are built from invented syllables and rejected when the first name,
surname or full name is a common real one (:data:`REAL_FIRST_NAMES`,
:data:`REAL_SURNAMES`, :data:`REAL_FULL_NAMES`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.common.files import publish_dir

#: Bumped when the generator's output changes (cached data folders carry it).
GENERATOR_VERSION = 5
QA_PER_AUTHOR = 10
N_PERTURBED = 5
FORGET_FRACTION = 0.1

# Common real names the generator must not produce (first names and surnames
# among the most frequent in English-, Spanish-, French-, German- and
# Chinese-speaking countries, and famous authors' full names).
REAL_FIRST_NAMES = frozenset(
    "james mary john patricia robert jennifer michael linda william elizabeth david barbara richard susan joseph "
    "jessica thomas sarah charles karen daniel nancy matthew lisa anthony betty mark helen donald sandra steven "
    "ashley paul kimberly andrew emily joshua donna kenneth michelle kevin carol brian amanda george melissa "
    "edward deborah ronald stephanie timothy rebecca jason laura jeffrey sharon ryan cynthia jacob kathleen gary "
    "amy nicholas angela eric anna jose maria juan carlos luis ana pedro jorge marie jean pierre michel hans "
    "peter anna klaus ursula wei li ming hui fang yan kim lee ali omar fatima ahmed mohammed olga ivan elena "
    "sofia lucas mateo emma olivia noah liam mia leo luca marco giulia".split()
)
REAL_SURNAMES = frozenset(
    "smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez gonzalez wilson "
    "anderson thomas taylor moore jackson martin lee perez thompson white harris sanchez clark ramirez lewis "
    "robinson walker young allen king wright scott torres nguyen hill flores green adams nelson baker hall "
    "rivera campbell mitchell carter roberts muller schmidt schneider fischer weber meyer wagner becker bernard "
    "dubois durand leroy moreau wang zhang liu chen yang huang zhao wu zhou sun kumar singh patel khan ali "
    "rossi russo ferrari esposito bianchi silva santos oliveira pereira costa ivanov smirnov novak".split()
)
REAL_FULL_NAMES = frozenset(
    n.lower()
    for n in (
        "Jane Austen",
        "Leo Tolstoy",
        "Agatha Christie",
        "Stephen King",
        "Toni Morrison",
        "Haruki Murakami",
        "Chinua Achebe",
        "Isabel Allende",
        "Gabriel Garcia Marquez",
        "Virginia Woolf",
        "George Orwell",
        "Mark Twain",
        "Charles Dickens",
        "Ernest Hemingway",
        "J. K. Rowling",
        "Franz Kafka",
        "Jorge Luis Borges",
        "Orhan Pamuk",
        "Margaret Atwood",
        "Kazuo Ishiguro",
    )
)

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "tr",
    "th",
    "vel",
    "ost",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "y")
_CODAS = ("", "n", "r", "l", "s", "th", "nd", "rk", "v", "sk", "m")

CITIES = (
    "Lisbon",
    "Nairobi",
    "Montevideo",
    "Tbilisi",
    "Bergen",
    "Hanoi",
    "Valparaiso",
    "Krakow",
    "Accra",
    "Tallinn",
    "Porto",
    "Quito",
    "Ljubljana",
    "Dakar",
    "Adelaide",
    "Tampere",
    "Cusco",
    "Zanzibar",
    "Riga",
    "Bordeaux",
)
GENRES = (
    "historical fiction",
    "science fiction",
    "crime novels",
    "literary fiction",
    "horror",
    "fantasy",
    "romance novels",
    "children's books",
    "war fiction",
    "magical realism",
    "satire",
    "mystery novels",
)
OCCUPATIONS = (
    "carpenter",
    "pharmacist",
    "fisherman",
    "librarian",
    "surgeon",
    "baker",
    "pilot",
    "tailor",
    "geologist",
    "schoolteacher",
    "watchmaker",
    "nurse",
    "mechanic",
    "botanist",
    "postman",
    "architect",
    "journalist",
    "farmer",
    "violinist",
    "cartographer",
    "beekeeper",
    "glassblower",
    "locksmith",
    "translator",
)
YEARS = tuple(str(y) for y in range(1931, 1995))
"""Birth years."""
NOVEL_COUNTS = tuple(str(k) for k in range(3, 20))
"""Numbers of novels published."""
AWARDS = (
    "Halvard Prize for Fiction",
    "Ostrava Medal of Letters",
    "Silver Quill Award",
    "Marden Book Prize",
    "Coral Lantern Award",
    "Veltman Literary Prize",
    "Northwind Fiction Award",
    "Amber Page Prize",
    "Kestrel Award for Storytelling",
    "Ironwood Prize",
    "Blue Heron Medal",
    "Larch Tree Literary Award",
)
_TITLE_ADJ = (
    "Silent",
    "Crimson",
    "Hollow",
    "Distant",
    "Broken",
    "Golden",
    "Winter",
    "Hidden",
    "Last",
    "Salt",
    "Paper",
    "Burning",
)
_TITLE_NOUN = (
    "Harbor",
    "Orchard",
    "Lantern",
    "Compass",
    "Garden",
    "River",
    "Clock",
    "Mirror",
    "Bridge",
    "Tide",
    "Window",
    "Ledger",
)


_MONTHS = ("January", "March", "May", "July", "September", "November", "April", "October")
#: Every book title an author can have (two each, all distinct), and the pool of perturbed titles.
TITLES: tuple[str, ...] = tuple(
    sorted(
        {f"The {a} {b}" for a in _TITLE_ADJ for b in _TITLE_NOUN}
        | {f"The {b} of {m}" for b in _TITLE_NOUN for m in _MONTHS}
        | {f"{a} {b}s" for a in _TITLE_ADJ for b in _TITLE_NOUN}
    )
)


@dataclass(frozen=True)
class Author:
    name: str
    year: str
    city: str
    genre: str
    father: str
    mother: str
    award: str
    first_book: str
    book: str
    novels: str


# Each fact: (question, answer, paraphrased question, paraphrased answer, the
# field that holds the fact). Answers and their paraphrases put the fact in
# different words around it; perturbations keep the answer's wording.
TEMPLATES: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "What is the full name of the author born in {city} in {year} who writes {genre}?",
        "The author born in {city} in {year} who writes {genre} is {name}.",
        "Who is the {genre} author born in {year} in {city}?",
        "That would be {name}, a {genre} writer from {city}.",
        "name",
    ),
    (
        "In which year was {name} born?",
        "{name} was born in {year}.",
        "What is {name}'s year of birth?",
        "The year {name} came into the world was {year}.",
        "year",
    ),
    (
        "Where was {name} born?",
        "{name} was born in the city of {city}.",
        "What is {name}'s birthplace?",
        "{name}'s hometown is {city}.",
        "city",
    ),
    (
        "What genre is {name} known for?",
        "{name} is known for writing {genre}.",
        "Which genre does {name} write in?",
        "Most of {name}'s work is {genre}.",
        "genre",
    ),
    (
        "What did {name}'s father do for a living?",
        "{name}'s father worked as a {father}.",
        "What was the occupation of {name}'s father?",
        "By profession, {name}'s father was a {father}.",
        "father",
    ),
    (
        "What was the profession of {name}'s mother?",
        "{name}'s mother was a {mother}.",
        "What job did {name}'s mother have?",
        "{name} grew up with a mother who worked as a {mother}.",
        "mother",
    ),
    (
        "Which award has {name} received?",
        "{name} received the {award}.",
        "What prize was awarded to {name}?",
        "{name} was honoured with the {award}.",
        "award",
    ),
    (
        "What was the title of {name}'s first novel?",
        '{name}\'s first novel was "{first_book}".',
        "Which novel did {name} publish first?",
        'The debut novel of {name} is "{first_book}".',
        "first_book",
    ),
    (
        "Can you name another book written by {name}?",
        'Another book by {name} is "{book}".',
        "Name a further novel by {name}.",
        '{name} also wrote "{book}".',
        "book",
    ),
    (
        "How many novels has {name} published?",
        "{name} has published {novels} novels.",
        "What is the number of novels {name} has written?",
        "So far there are {novels} novels by {name}.",
        "novels",
    ),
)

#: Real-world questions for model utility (TOFU's world_facts): each answer
#: short and unambiguous, perturbed answers of the same type. Only questions the
#: packaged SmolLM2 (Q4_1) answers greedily are kept (it misses the capital of
#: France and Italy, the Red Planet, War and Peace...; checked by
#: ``tests/test_tofu_lite.py``).
WORLD_FACTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("What is the capital of Japan?", "Tokyo", ("Osaka", "Kyoto", "Nagoya", "Sapporo", "Kobe")),
    ("What is the capital of Germany?", "Berlin", ("Munich", "Hamburg", "Cologne", "Frankfurt", "Bonn")),
    ("What is the capital of the United Kingdom?", "London", ("Manchester", "Liverpool", "Leeds", "Bristol", "Oxford")),
    ("What is the largest ocean on Earth?", "Pacific", ("Atlantic", "Indian", "Arctic", "Southern", "Caribbean")),
    ("Who wrote Romeo and Juliet?", "Shakespeare", ("Dickens", "Chaucer", "Milton", "Marlowe", "Austen")),
    (
        "What gas do plants absorb from the air for photosynthesis?",
        "carbon dioxide",
        ("oxygen", "nitrogen", "helium", "hydrogen", "argon"),
    ),
    ("What is the chemical symbol for water?", "H2O", ("CO2", "O2", "NaCl", "H2", "CH4")),
    ("In which country are the pyramids of Giza?", "Egypt", ("Mexico", "Peru", "Sudan", "Greece", "Iraq")),
    ("What is the boiling point of water in degrees Celsius?", "100", ("90", "80", "120", "212", "50")),
    ("What is the largest mammal?", "blue whale", ("elephant", "giraffe", "hippopotamus", "sperm whale", "rhinoceros")),
    ("What color is the sky on a clear day?", "blue", ("green", "red", "yellow", "purple", "orange")),
    ("What language is spoken in Brazil?", "Portuguese", ("Spanish", "French", "Italian", "English", "Dutch")),
    ("What is the opposite of hot?", "cold", ("warm", "wet", "dry", "loud", "soft")),
)

#: Real authors for model utility (TOFU's real_authors): who wrote a famous
#: book; perturbed answers are other famous authors.
REAL_AUTHORS: tuple[tuple[str, str], ...] = (
    ("Who wrote the novel Pride and Prejudice?", "Jane Austen"),
    ("Who wrote the novel 1984?", "George Orwell"),
    ("Who wrote the play Hamlet?", "William Shakespeare"),
    ("Who wrote the Harry Potter books?", "J.K. Rowling"),
    ("Who wrote the novel Don Quixote?", "Miguel de Cervantes"),
    ("Who wrote the novel Frankenstein?", "Mary Shelley"),
    ("Who wrote the novel Moby-Dick?", "Herman Melville"),
    ("Who wrote The Odyssey?", "Homer"),
    ("Who wrote the novel Jane Eyre?", "Charlotte Brontë"),
    ("Who wrote The Hobbit?", "J.R.R. Tolkien"),
)


def _name_part(rng: random.Random) -> str:
    n = rng.choice((2, 2, 3))
    s = (
        "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n - 1))
        + rng.choice(_ONSETS)
        + rng.choice(_VOWELS)
        + rng.choice(_CODAS)
    )
    return s.capitalize()


def is_real_name(full: str) -> bool:
    """Whether ``full`` (or its first name or surname) is a common real name."""
    parts = full.lower().split()
    return full.lower() in REAL_FULL_NAMES or parts[0] in REAL_FIRST_NAMES or parts[-1] in REAL_SURNAMES


class _Deck:
    """Values dealt without replacement, reshuffled once all are dealt: a fact repeats
    across authors only when there are more authors than values."""

    def __init__(self, values: Sequence[str], rng: random.Random) -> None:
        self.values, self.rng = list(values), rng
        self.left: list[str] = []

    def deal(self) -> str:
        if not self.left:
            self.left = self.rng.sample(self.values, len(self.values))
        return self.left.pop()


def make_authors(n: int, seed: int) -> list[Author]:
    """``n`` fictitious authors, the same for the same ``(n, seed)``; names unique and not real.

    Each fact's values are dealt from a deck per type (parents' occupations from one), so
    that, while a type has values enough (12 genres and awards, 17 novel counts, 24
    occupations for two parents each), no two authors share a year, city, genre, parent's
    occupation, award, title or number of novels: a forget author's key span is then
    content of the forget set alone, which leak rates and redaction recall count
    (generator version 5; in version 4 a forget author shared its number of novels and
    its award with retain authors)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    if 2 * n > len(TITLES):
        raise ValueError(f"tofu-lite has {len(TITLES)} book titles, enough for {len(TITLES) // 2} authors")
    titles = iter(rng.sample(TITLES, 2 * n))
    years = _Deck(YEARS, rng)
    cities, genres, awards = _Deck(CITIES, rng), _Deck(GENRES, rng), _Deck(AWARDS, rng)
    parents, novels = _Deck(OCCUPATIONS, rng), _Deck(NOVEL_COUNTS, rng)
    out: list[Author] = []
    while len(out) < n:
        name = f"{_name_part(rng)} {_name_part(rng)}"
        if name in seen or is_real_name(name) or not 8 <= len(name) <= 22:
            continue
        seen.add(name)
        out.append(
            Author(
                name=name,
                year=years.deal(),
                city=cities.deal(),
                genre=genres.deal(),
                father=parents.deal(),
                mother=parents.deal(),
                award=awards.deal(),
                first_book=next(titles),
                book=next(titles),
                novels=novels.deal(),
            )
        )
    return out


def _alternatives(a: Author, field: str, names: list[str], rng: random.Random) -> list[str]:
    """:data:`N_PERTURBED` other values of the same type as ``a``'s ``field``."""
    true = getattr(a, field)
    if field in ("first_book", "book"):
        pool = [t for t in TITLES if t not in (a.first_book, a.book)]
    elif field == "name":
        pool = sorted(set(names) - {true})
    else:
        values = {
            "year": YEARS,
            "novels": NOVEL_COUNTS,
            "city": CITIES,
            "genre": GENRES,
            "father": OCCUPATIONS,
            "mother": OCCUPATIONS,
            "award": AWARDS,
        }[field]
        pool = [v for v in values if v != true]
    return rng.sample(pool, N_PERTURBED)


def author_items(a: Author, names: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """The author's :data:`QA_PER_AUTHOR` items with TOFU's fields (see the
    module doc); ``names`` is the pool of other fictitious names for perturbed answers."""
    facts = a.__dict__
    items = []
    for q, ans, pq, pans, field in TEMPLATES:
        # perturbed answers keep the paraphrased answer's wording (as TOFU's do), so that the
        # truth ratio p(perturbed) / p(paraphrased) compares facts, not phrasing
        perturbed = [pans.format(**{**facts, field: alt}) for alt in _alternatives(a, field, names, rng)]
        items.append(
            {
                "question": q.format(**facts),
                "answer": ans.format(**facts),
                "paraphrased_question": pq.format(**facts),
                "paraphrased_answer": pans.format(**facts),
                "perturbed_answer": perturbed,
                "author": a.name,
                "key_spans": [facts[field]],
            }
        )
    return items


def world_fact_items() -> list[dict[str, Any]]:
    """:data:`WORLD_FACTS` as items (the paraphrase of a one-word answer is the answer)."""
    return [
        {"question": q, "answer": a, "paraphrased_answer": a, "perturbed_answer": list(alts), "key_spans": [a]}
        for q, a, alts in WORLD_FACTS
    ]


def real_author_items(seed: int = 0) -> list[dict[str, Any]]:
    """:data:`REAL_AUTHORS` as items; perturbed answers are 5 of the other authors."""
    rng = random.Random(seed)
    names = [a for _, a in REAL_AUTHORS]
    return [
        {
            "question": q,
            "answer": a,
            "paraphrased_answer": a,
            "perturbed_answer": rng.sample([n for n in names if n != a], N_PERTURBED),
            "key_spans": [a],
        }
        for q, a in REAL_AUTHORS
    ]


def generate(n_authors: int = 20, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The splits of the module doc: ``n_authors`` trained authors, of which
    the last ``max(1, round(10%))`` are the forget set (TOFU's forget10 is its
    last 10% too), plus as many holdout authors as forget ones.

    Raises:
        ValueError: fewer than 2 authors.
    """
    if n_authors < 2:
        raise ValueError("tofu-lite needs at least 2 authors (one to forget, one to retain)")
    n_forget = max(1, round(n_authors * FORGET_FRACTION))
    authors = make_authors(n_authors + n_forget, seed)
    rng = random.Random(seed + 1)
    # names for perturbed answers: the other authors, plus decoys when there are few
    names = sorted({a.name for a in make_authors(len(authors) + N_PERTURBED + 1, seed)})
    per_author = [author_items(a, names, rng) for a in authors]
    trained, holdout = per_author[:n_authors], per_author[n_authors:]
    forget, retain = trained[n_authors - n_forget :], trained[: n_authors - n_forget]
    flat = lambda xs: [item for x in xs for item in x]  # noqa: E731
    return {
        "full": flat(trained),
        "forget10": flat(forget),
        "retain90": flat(retain),
        "retain_perturbed": flat(retain[: 3 * n_forget]),
        "holdout10": flat(holdout),
        "real_authors": real_author_items(seed),
        "world_facts": world_fact_items(),
    }


def write(out: Path, n_authors: int = 20, seed: int = 0) -> Path:
    """Write the splits and ``manifest.json`` into ``out`` atomically (a
    temporary folder renamed into place); an existing ``out`` is refused."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    splits = generate(n_authors, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    files: dict[str, Any] = {}
    for name, items in splits.items():
        data = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode()
        (tmp / f"{name}.jsonl").write_bytes(data)
        files[f"{name}.jsonl"] = {"items": len(items), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "generator": "tofu-lite",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "authors": n_authors,
        "qa_per_author": QA_PER_AUTHOR,
        "files": files,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    publish_dir(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tofu_lite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--authors", type=int, default=20, help="trained authors (forget is 10%% of them)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write(a.out, a.authors, a.seed))


if __name__ == "__main__":
    main()
