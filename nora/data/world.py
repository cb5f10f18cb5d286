"""A generated "world" for the offline LLM demo: people with attributes and relations, arithmetic and units.

One seeded :class:`World` yields, deterministically,

* **pretraining text** (:func:`pretraining_text`): every fact of every person rendered through several varied
  templates, biographies in shuffled order, arithmetic and unit statements in words and symbols, quiz pages about
  the tuning split only, and real English prose that ships with Python (the standard library's documentation
  topics, ``pydoc_data.topics``);
* **instruction data** in Alpaca's format (:func:`instruction_records`: ``{instruction, input, output}``) about
  the *tuning* people and number pairs only: lookups, relations (someone's mentor, and two-step: the city of
  someone's mentor), arithmetic and unit conversions, answered briefly or in a sentence;
* **four-choice questions in MMLU's CSV layout** (:func:`write_mmlu`): ``dev/`` (the 5 shots, tuning people),
  ``val/`` (learning-rate tuning) and ``test/`` (scoring) about disjoint groups of people and number pairs, whose
  facts the model saw only as prose in pretraining; a ``subjects.json`` names the subjects' categories (``STEM``:
  arithmetic and units; ``knowledge``: facts and relations), which :mod:`nora.eval.mmlu_data` reads.

Nothing here touches torch; :func:`write_world` writes all three to a folder.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

NAMES = (
    "Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Maya Noah Olga Paul Rosa Sam Tina Umar "
    "Vera Walter Xenia Yusuf Zoe Adam Bella Carl Diana Erik Fiona George Hanna Ivan Julia Karl Lena Max Nina "
    "Oscar Petra Quinn Ruth Simon Tara Victor Wendy Alice Bruno Celia Dora Elias Frida Hugo Ines Jonas Lara "
    "Milo Nadia Otto"
).split()
CITIES = ("Paris Rome Berlin Madrid Vienna Prague Lisbon Oslo Dublin Athens Warsaw Zurich").split()
JOBS = ("baker teacher doctor pilot farmer painter lawyer nurse chef engineer singer tailor").split()
UNITS = (  # (big unit, small unit, factor)
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("kilograms", "grams", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("liters", "milliliters", 1000),
)
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
SPLITS = ("tune", "dev", "val", "test")  # who is asked about where (people and number pairs are disjoint by split)
SUBJECTS = {"arithmetic": "STEM", "units": "STEM", "facts": "knowledge", "relations": "knowledge"}

FACT_TEMPLATES = {
    "city": [
        "{n} lives in {v}.",
        "{n} has a home in {v}.",
        "The city where {n} lives is {v}.",
        "{n} moved to {v} years ago.",
        "You can find {n} in {v}.",
        "{n} is a resident of {v}.",
    ],
    "job": [
        "{n} works as a {v}.",
        "{n} is a {v}.",
        "By trade, {n} is a {v}.",
        "The job of {n} is {v}.",
        "{n} earns a living as a {v}.",
        "Everyone knows {n} as a {v}.",
    ],
    "mentor": [
        "The mentor of {n} is {v}.",
        "{n} learned everything from {v}.",
        "{v} is the mentor of {n}.",
        "{n} was taught by {v}.",
        "{n} asks {v} for advice.",
        "{n}'s mentor is {v}.",
    ],
}
QUESTIONS = {
    "city": "Where does {n} live?",
    "job": "What is the job of {n}?",
    "mentor": "Who is the mentor of {n}?",
    "mentor_city": "In which city does the mentor of {n} live?",
}
ANSWERS = {
    "city": "{n} lives in {v}.",
    "job": "{n} works as a {v}.",
    "mentor": "The mentor of {n} is {v}.",
    "mentor_city": "The mentor of {n} is {m}, who lives in {v}.",
}


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    mentor: str
    split: str


@dataclass
class World:
    """People (each in one split), their facts, and the number pairs of each split; all from ``seed``."""

    seed: int = 0
    people: list[Person] = field(default_factory=list)
    sums: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    conversions: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # (unit index, amount)
    max_amount: int = 12

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)

    def in_split(self, split: str) -> list[Person]:
        return [p for p in self.people if p.split == split]


def make_world(
    seed: int = 0,
    n_people: int = 48,
    max_addend: int = 12,
    max_amount: int = 12,
    shares: dict[str, float] | None = None,
) -> World:
    """The world of ``seed``: ``n_people`` names, each with a city, a job and a mentor (another person); people, sums
    ``a + b`` (0 <= a, b <= ``max_addend``) and conversions (1 to ``max_amount`` of each unit) are dealt to the
    splits by ``shares``."""
    if not 8 <= n_people <= len(NAMES):
        raise ValueError(f"n_people={n_people}; valid: 8 to {len(NAMES)}")
    if max_amount < 4 or max_addend < 2:
        raise ValueError(
            f"max_amount={max_amount}, max_addend={max_addend}: a question needs three wrong answers; "
            "valid: max_amount >= 4, max_addend >= 2"
        )
    shares = shares or {"tune": 0.35, "dev": 0.1, "val": 0.2, "test": 0.35}
    rng = random.Random(seed)
    names = list(NAMES)
    rng.shuffle(names)
    names = names[:n_people]

    def deal(items: list) -> dict[str, list]:
        items = list(items)
        rng.shuffle(items)
        out, start = {}, 0
        for i, s in enumerate(SPLITS):
            end = len(items) if i == len(SPLITS) - 1 else start + round(shares[s] * len(items))
            out[s] = items[start:end]
            start = end
        return out

    split_of = {n: s for s, ns in deal(names).items() for n in ns}
    people = []
    for n in names:
        mentor = rng.choice([m for m in names if m != n])
        people.append(Person(n, rng.choice(CITIES), rng.choice(JOBS), mentor, split_of[n]))
    sums = deal([(a, b) for a in range(max_addend + 1) for b in range(max_addend + 1)])
    conversions = deal([(u, k) for u in range(len(UNITS)) for k in range(1, max_amount + 1)])
    return World(seed, people, sums, conversions, max_amount)


# ------------------------------------------------------------------------------------ pretraining
def _fact_sentences(p: Person, rng: random.Random, per_fact: int) -> list[str]:
    out = []
    for attr, templates in FACT_TEMPLATES.items():
        for t in rng.sample(templates, per_fact):
            out.append(t.format(n=p.name, v=getattr(p, attr)))
    return out


def _number(k: int, rng: random.Random) -> str:
    return NUMBER_WORDS[k] if k < len(NUMBER_WORDS) and rng.random() < 0.3 else str(k)


def _sum_sentences(a: int, b: int, rng: random.Random) -> list[str]:
    c = a + b
    forms = [
        f"{a} + {b} = {c}.",
        f"{a} plus {b} is {c}.",
        f"Adding {b} to {a} gives {c}.",
        f"The sum of {a} and {b} is {c}.",
        f"{c} - {b} = {a}.",
    ]
    return rng.sample(forms, 3)


def _unit_sentences(u: int, k: int, rng: random.Random) -> list[str]:
    big, small, f = UNITS[u]
    forms = [
        f"{k} {big} is {k * f} {small}.",
        f"There are {k * f} {small} in {k} {big}.",
        f"{_number(k, rng).capitalize()} {big} make {k * f} {small}.",
        f"One of the {big} is {f} {small}, so {k} {big} are {k * f} {small}.",
    ]
    return rng.sample(forms, 2)


def prose_paragraphs(limit_chars: int) -> list[str]:
    """Real English prose that ships with Python: paragraphs of the standard library's documentation topics
    (``pydoc_data.topics``), in their order, up to ``limit_chars`` characters."""
    from pydoc_data.topics import topics

    out, total = [], 0
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if len(para) < 80 or not para[0].isalpha():  # skip code, tables and headings
                continue
            out.append(para)
            total += len(para)
            if total >= limit_chars:
                return out
    return out


def faq_block(q: "Question") -> str:
    """A question as the pretraining text's FAQ pages write it: ``Question: ...`` and ``Answer: ...`` on two lines,
    the question-answer form that MMLU's continuation protocol scores (as web text teaches a real base model the
    form of a quiz); the instruction data uses Alpaca's template instead."""
    return f"Question: {q.question}\nAnswer: {q.choices[q.answer]}"


def pretraining_text(
    world: World, repeats: int = 4, per_fact: int = 3, prose_chars: int = 20_000, faq_rounds: int = 2
) -> list[str]:
    """Documents for pretraining: ``repeats`` biographies per person (``per_fact`` phrasings of each fact, shuffled),
    every sum and conversion of every split stated in words (the model learns them all; only the questions are held
    out), ``faq_rounds`` quiz pages about the *tuning* split (five questions each, answered briefly in the
    ``Question:``/``Answer:`` form that MMLU's continuation protocol scores, as web text teaches a real base model
    that form; the people and pairs the evaluation asks about are never questioned in pretraining, only described) and
    ``prose_chars`` of standard-library prose; shuffled with the world's seed."""
    rng = random.Random(world.seed + 1)
    docs = []
    for _ in range(repeats):
        for p in world.people:
            sents = _fact_sentences(p, rng, per_fact)
            rng.shuffle(sents)
            docs.append(" ".join(sents))
        pairs = [ab for s in SPLITS for ab in world.sums[s]]
        rng.shuffle(pairs)
        for i in range(0, len(pairs), 6):
            docs.append(" ".join(s for a, b in pairs[i : i + 6] for s in _sum_sentences(a, b, rng)[:2]))
        conv = [uk for s in SPLITS for uk in world.conversions[s]]
        rng.shuffle(conv)
        for i in range(0, len(conv), 4):
            docs.append(" ".join(s for u, k in conv[i : i + 4] for s in _unit_sentences(u, k, rng)[:1]))
    for _ in range(faq_rounds):
        qs = questions(world, "tune", rng)
        rng.shuffle(qs)
        docs += ["\n".join(faq_block(q) for q in qs[i : i + 5]) for i in range(0, len(qs), 5)]
    docs += prose_paragraphs(prose_chars)
    rng.shuffle(docs)
    return docs


# ------------------------------------------------------------------------------------ questions
@dataclass(frozen=True)
class Question:
    """A question with its correct answer and three distinct wrong ones (``choices[answer]`` is correct)."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int
    explanation: str  # the free-form answer the instruction data uses


def _choices(rng: random.Random, right, pool) -> tuple[tuple, int]:
    """Four options: ``right`` and three others from ``pool``; numbers are drawn from those with as many digits as
    ``right`` where there are enough (a continuation score sums log-probabilities over an option's tokens, so a
    shorter number would win on length alone)."""
    if isinstance(right, int):
        same = [x for x in pool if len(str(x)) == len(str(right))]
        pool = same if len(same) >= 4 else pool
    wrong = rng.sample([x for x in pool if x != right], 3)
    opts = wrong + [right]
    rng.shuffle(opts)
    return tuple(str(o) for o in opts), opts.index(right)


def questions(world: World, split: str, rng: random.Random) -> list[Question]:
    """Every question about ``split``'s people and number pairs, one per (person, attribute) and per pair."""
    out = []
    names = [p.name for p in world.people]
    pools = {"city": CITIES, "job": JOBS, "mentor": names, "mentor_city": CITIES}
    for p in world.in_split(split):
        for attr in ("city", "job", "mentor", "mentor_city"):
            m = world.person(p.mentor)
            value = m.city if attr == "mentor_city" else getattr(p, attr)
            choices, answer = _choices(rng, value, pools[attr])
            subject = "relations" if attr.startswith("mentor") else "facts"
            out.append(
                Question(
                    subject,
                    QUESTIONS[attr].format(n=p.name),
                    choices,
                    answer,
                    ANSWERS[attr].format(n=p.name, v=value, m=m.name),
                )
            )
    for a, b in world.sums[split]:
        c = a + b
        pool = [x for x in range(max(0, c - 6), c + 7)]
        choices, answer = _choices(rng, c, pool)
        out.append(Question("arithmetic", f"What is {a} + {b}?", choices, answer, f"{a} + {b} = {c}."))
    for u, k in world.conversions[split]:
        big, small, f = UNITS[u]
        pool = [k2 * f for k2 in range(1, world.max_amount + 1)]
        choices, answer = _choices(rng, k * f, pool)
        out.append(
            Question(
                "units",
                f"How many {small} are in {k} {big}?",
                choices,
                answer,
                f"There are {k * f} {small} in {k} {big}.",
            )
        )
    return out


def instruction_records(world: World, sentence_share: float = 0.5) -> list[dict]:
    """Alpaca records about the tuning split: each question with its short answer (the text a four-choice option
    holds) and, for a ``sentence_share`` of them, once more answered in a full sentence; shuffled."""
    rng = random.Random(world.seed + 2)
    recs = []
    for q in questions(world, "tune", rng):
        recs.append({"instruction": q.question, "input": "", "output": q.choices[q.answer]})
        if rng.random() < sentence_share:
            recs.append({"instruction": q.question, "input": "", "output": q.explanation})
    rng.shuffle(recs)
    return recs


def write_mmlu(world: World, root: Path, per_subject: dict[str, int] | None = None) -> dict[str, dict[str, int]]:
    """MMLU's CSV layout under ``root``: ``{dev,val,test}/<subject>_{split}.csv`` (no header; question, A-D, answer
    letter) and ``subjects.json`` (``{subject: {"category": ...}}``). ``per_subject`` caps the questions per subject
    and split (dev: 5, the shots). Returns the counts written."""
    caps = {"dev": 5, **(per_subject or {})}
    counts: dict[str, dict[str, int]] = {}
    for split in ("dev", "val", "test"):
        rng = random.Random(f"{world.seed}-{split}")
        qs = questions(world, split, rng)
        (root / split).mkdir(parents=True, exist_ok=True)
        counts[split] = {}
        for subject in SUBJECTS:
            rows = [q for q in qs if q.subject == subject]
            rng.shuffle(rows)
            rows = rows[: caps.get(split)] if caps.get(split) else rows
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                for q in rows:
                    w.writerow([q.question, *q.choices, "ABCD"[q.answer]])
            counts[split][subject] = len(rows)
    (root / "subjects.json").write_text(json.dumps({s: {"category": c} for s, c in SUBJECTS.items()}, indent=1))
    return counts


def write_world(world: World, root: Path) -> dict:
    """``root/pretrain.txt`` (documents separated by blank lines), ``root/alpaca.json`` and ``root/mmlu/``;
    returns what was written, with counts."""
    root.mkdir(parents=True, exist_ok=True)
    docs = pretraining_text(world)
    (root / "pretrain.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    recs = instruction_records(world)
    (root / "alpaca.json").write_text(json.dumps(recs, indent=0), encoding="utf-8")
    counts = write_mmlu(world, root / "mmlu")
    return {
        "pretrain_documents": len(docs),
        "pretrain_chars": sum(map(len, docs)),
        "instructions": len(recs),
        "mmlu": counts,
    }
