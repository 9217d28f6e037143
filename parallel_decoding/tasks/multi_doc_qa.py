"""Seeded generator of a small synthetic multi-document QA set in the LongBench ``2wikimqa`` jsonl format.

Every entity is fictional (people, films, novels, cities, countries), so a model can only answer from the passages.
Each question needs two facts (or four, for bridge comparisons) that sit in different passages, mixed with
distractor passages about other fictional entities, as in 2WikiMultihopQA:

- comparison:         "Which film came out first, A or B?"            (passages A and B)
- people comparison:  "Who was born first, P or Q?"  / same nationality? (passages P and Q)
- compositional:      "Where was the director of film A born?"         (passage A names P; passage P says where)
- bridge comparison:  "Which film has the director born later, A or B?" (A, B and both directors' passages)

Row fields follow LongBench: ``input`` (question), ``context`` (``Passage i:\\n<title>\\n<text>`` blocks),
``answers`` (list), ``length`` (words in context), ``dataset``, ``language``, ``all_classes`` (null), ``_id``.
Extra fields ``type`` and ``evidence_titles`` say what kind of question it is and which passages hold the facts.

    python -m parallel_decoding.tasks.multi_doc_qa --num_rows 30 --seed 1234 --output data/multi_document_qa.jsonl
"""

import argparse
import hashlib
import random
import sys

from .retrieval import write_jsonl

COUNTRIES = {  # fictional country -> nationality adjective
    "Dorvania": "Dorvanian",
    "Kelstria": "Kelstrian",
    "Amerith": "Amerithian",
    "Tavrosia": "Tavrosian",
    "Quellan": "Quellanese",
    "Brisovia": "Brisovian",
    "Halvoria": "Halvorian",
    "Ysmera": "Ysmeran",
}
CITIES = {  # fictional city -> its country
    "Maravel": "Dorvania",
    "Kestrow": "Dorvania",
    "Lunmoor": "Kelstria",
    "Thessby": "Kelstria",
    "Orvane": "Amerith",
    "Caldreth": "Amerith",
    "Pellion": "Tavrosia",
    "Varnholt": "Tavrosia",
    "Sirenne": "Quellan",
    "Ebbridge": "Quellan",
    "Morrask": "Brisovia",
    "Tolvik": "Brisovia",
    "Ashwyn": "Halvoria",
    "Drelmouth": "Halvoria",
    "Qarsel": "Ysmera",
    "Ulmfeld": "Ysmera",
}
FIRST_NAMES = (
    "Orlan",
    "Veska",
    "Tamsin",
    "Idrel",
    "Corvin",
    "Maelis",
    "Jorund",
    "Saffi",
    "Edric",
    "Lioba",
    "Brannoc",
    "Ysolde",
    "Kasimir",
    "Renna",
    "Aldous",
    "Fenna",
    "Ilario",
    "Mirela",
    "Osric",
    "Talia",
    "Bertil",
    "Celandine",
    "Dagny",
    "Evander",
    "Gisla",
    "Halvard",
    "Ione",
    "Lorcan",
    "Nerys",
    "Perrin",
)
LAST_NAMES = (
    "Vesterby",
    "Draymoor",
    "Quillon",
    "Harthwell",
    "Ostrander",
    "Pemberlow",
    "Kallisen",
    "Thistlewood",
    "Barrowe",
    "Calloran",
    "Dunmere",
    "Everholt",
    "Fairbrook",
    "Greyling",
    "Holloway",
    "Ivensworth",
    "Jarrow",
    "Kettleby",
    "Lindmark",
    "Marwick",
    "Norrend",
    "Oakhurst",
    "Pryce",
    "Ravensdale",
    "Selwyn",
    "Tregaron",
)
TITLE_ADJECTIVES = (
    "Glass",
    "Silent",
    "Crimson",
    "Hollow",
    "Northern",
    "Last",
    "Paper",
    "Iron",
    "Golden",
    "Distant",
    "Broken",
    "Winter",
    "Quiet",
    "Salt",
    "Burning",
    "Forgotten",
    "Seventh",
    "Velvet",
    "Sunken",
    "Amber",
)
TITLE_NOUNS = (
    "Harbour",
    "Orchard",
    "Lantern",
    "Meridian",
    "Garden",
    "Tide",
    "Engine",
    "Choir",
    "Archive",
    "Bridge",
    "Festival",
    "Compass",
    "Winter",
    "Lighthouse",
    "Carousel",
    "Frontier",
    "Mirror",
    "Verdict",
    "Voyage",
    "Cellar",
)
MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
FILM_GENRES = ("drama", "comedy", "thriller", "war", "musical", "mystery", "romance", "adventure")
NOVEL_GENRES = ("historical", "crime", "science fiction", "coming-of-age", "satirical", "gothic")
PROFESSIONS = {"film": "film director", "novel": "novelist"}
CAREER_LINES = (
    "{surname} began as a stage actor before moving behind the camera.",
    "{surname} studied philosophy and worked as a newspaper critic for a decade.",
    "{surname} was known for long takes and for working with the same crew for years.",
    "{surname} taught literature at a provincial school before the first success.",
    "{surname} won the national arts prize twice.",
    "{surname} spent most of a long career abroad and returned home late in life.",
    "{surname} kept detailed diaries, which were published decades later.",
    "{surname} also wrote essays on music and architecture.",
)
WORK_LINES = (
    "The story follows a family whose fortunes change over one summer.",
    "It follows two rivals who are forced to work together.",
    "Critics praised its photography but found the ending abrupt.",
    "It was a modest success on release and later became a cult favourite.",
    "The plot centres on a missing letter and the town that searches for it.",
    "It was adapted for radio a few years later.",
    "Its score was written by a then unknown composer.",
    "It was banned for a short time because of its political themes.",
)
PASSAGES_PER_ROW = (6, 8)  # min, max passages in a row's context, evidence included
QUESTION_TYPES = ("comparison", "people_comparison", "compositional", "bridge_comparison")


def _date_text(date: tuple) -> str:
    year, month, day = date
    return f"{day} {MONTHS[month - 1]} {year}"


def _world(rng: random.Random, num_people: int) -> tuple:
    """Fictional people, each with one or two works; all names, titles and birth dates distinct within the row."""
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], num_people)
    titles = rng.sample([f"The {a} {n}" for a in TITLE_ADJECTIVES for n in TITLE_NOUNS if a != n], 2 * num_people)
    birth_years = rng.sample(range(1890, 1960), num_people)
    people, works = [], []
    for name, birth_year in zip(names, birth_years):
        kind = rng.choice(("film", "novel"))
        city = rng.choice(list(CITIES))
        person = {
            "name": name,
            "kind": kind,
            "city": city,
            "country": CITIES[city],
            "born": (birth_year, rng.randint(1, 12), rng.randint(1, 28)),
            "works": [],
        }
        for _ in range(rng.choice((1, 1, 2))):
            year = birth_year + rng.randint(25, 55)
            genre = rng.choice(FILM_GENRES if kind == "film" else NOVEL_GENRES)
            work = {
                "title": titles.pop(),
                "kind": kind,
                "year": year,
                "genre": genre,
                "creator": name,
                "city": rng.choice(list(CITIES)),
            }
            person["works"].append(work["title"])
            works.append(work)
        people.append(person)
    return people, works


def _person_passage(rng: random.Random, person: dict) -> str:
    surname = person["name"].split()[-1]
    nationality = COUNTRIES[person["country"]]
    listed = ", ".join(person["works"])
    known_for = "films include" if person["kind"] == "film" else "novels include"
    return (
        f"{person['name']} (born {_date_text(person['born'])} in {person['city']}, {person['country']}) was a "
        f"{nationality} {PROFESSIONS[person['kind']]}. "
        f"{rng.choice(CAREER_LINES).format(surname=surname)} {surname}'s {known_for} {listed}."
    )


def _work_passage(rng: random.Random, work: dict, people_by_name: dict) -> str:
    creator = people_by_name[work["creator"]]
    nationality = COUNTRIES[creator["country"]]
    if work["kind"] == "film":
        head = (
            f"{work['title']} is a {work['year']} {nationality} {work['genre']} film directed by "
            f"{work['creator']}. It was shot in {work['city']}."
        )
    else:
        head = (
            f"{work['title']} is a {work['genre']} novel by the {nationality} writer {work['creator']}, "
            f"first published in {work['year']}. It is set in {work['city']}."
        )
    return f"{head} {rng.choice(WORK_LINES)}"


def _pick_question(rng: random.Random, qtype: str, people: list, works: list, people_by_name: dict) -> tuple:
    """(question, answer, evidence titles) for one question type; None if this world cannot support it."""
    if qtype == "comparison":
        kind = rng.choice(("film", "novel"))
        pool = [w for w in works if w["kind"] == kind]
        pairs = [(a, b) for a in pool for b in pool if a["year"] < b["year"] and a["creator"] != b["creator"]]
        if not pairs:
            return None
        first, later = rng.choice(pairs)
        a, b = rng.sample((first, later), 2)
        verb = "came out" if kind == "film" else "was published"
        return (f"Which {kind} {verb} first, {a['title']} or {b['title']}?", first["title"], [a["title"], b["title"]])
    if qtype == "people_comparison":
        p, q = rng.sample(people, 2)
        if rng.random() < 0.5:
            earlier = min((p, q), key=lambda x: x["born"])
            return f"Who was born first, {p['name']} or {q['name']}?", earlier["name"], [p["name"], q["name"]]
        same = "yes" if p["country"] == q["country"] else "no"
        return f"Are {p['name']} and {q['name']} of the same nationality?", same, [p["name"], q["name"]]
    if qtype == "compositional":
        work = rng.choice(works)
        creator = people_by_name[work["creator"]]
        role = "director of film" if work["kind"] == "film" else "author of"
        asked = rng.choice(("city", "date", "country"))
        if asked == "city":
            question, answer = f"Where was the {role} {work['title']} born?", creator["city"]
        elif asked == "date":
            question, answer = f"When was the {role} {work['title']} born?", _date_text(creator["born"])
        else:
            question, answer = f"Which country is the {role} {work['title']} from?", creator["country"]
        return question, answer, [work["title"], creator["name"]]
    films = [w for w in works if w["kind"] == "film"]
    pairs = [(a, b) for a in films for b in films if a["creator"] != b["creator"]]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    later = max((a, b), key=lambda w: people_by_name[w["creator"]]["born"])
    return (
        f"Which film has the director born later, {a['title']} or {b['title']}?",
        later["title"],
        [a["title"], b["title"], a["creator"], b["creator"]],
    )


def make_multi_doc_qa_row(seed: int, index: int) -> dict:
    rng = random.Random(f"multi_doc_qa:{seed}:{index}")
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:
        people, works = _world(rng, num_people=6)
        people_by_name = {p["name"]: p for p in people}
        picked = _pick_question(rng, qtype, people, works, people_by_name)
        if picked is not None:
            break
    question, answer, evidence = picked
    passages = {p["name"]: _person_passage(rng, p) for p in people}
    passages.update({w["title"]: _work_passage(rng, w, people_by_name) for w in works})
    num_passages = max(len(evidence), rng.randint(*PASSAGES_PER_ROW))
    distractors = rng.sample([t for t in passages if t not in evidence], num_passages - len(evidence))
    order = evidence + distractors
    rng.shuffle(order)
    context = "\n".join(f"Passage {i}:\n{title}\n{passages[title]}" for i, title in enumerate(order, start=1))
    return {
        "input": question,
        "context": context,
        "answers": [answer],
        "length": len(context.split()),
        "dataset": "2wikimqa_synthetic",
        "language": "en",
        "all_classes": None,
        "_id": hashlib.sha256(f"multi_doc_qa:{seed}:{index}".encode()).hexdigest()[:48],
        "type": qtype,
        "evidence_titles": evidence,
    }


def make_multi_doc_qa_rows(num_rows: int, seed: int) -> list:
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    return [make_multi_doc_qa_row(seed, i) for i in range(num_rows)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_rows", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", required=True, help="jsonl file to write (e.g. data/multi_document_qa.jsonl)")
    args = parser.parse_args(argv)
    try:
        rows = make_multi_doc_qa_rows(args.num_rows, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(rows, args.output)
    print(f"wrote {len(rows)} multi-document QA rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
