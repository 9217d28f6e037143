"""Seeded generator for the student-resume retrieval task.

Each row lists N fictional students (name, age, university, GPA, interests, a one-line self-introduction) and asks
which student's GPA lies in a range [lo, hi] that exactly one student satisfies. Checking a student against the
range does not depend on any other student, so the task splits naturally into one parallel branch per student.

    python -m parallel_decoding.tasks.retrieval --num_students 30 --num_rows 100 --seed 1234 \
        --output data/generated/retrieval_30.jsonl

Rows are generated from a per-row random stream keyed by (seed, num_students, row index), so the first k rows of a
larger file equal a smaller file made with the same seed, and the same seed always gives the same bytes.
"""

import argparse
import json
import random
import sys
from pathlib import Path

FIRST_NAMES = (
    "Ava",
    "Liam",
    "Mei",
    "Omar",
    "Sofia",
    "Kenji",
    "Amara",
    "Lucas",
    "Priya",
    "Mateo",
    "Hana",
    "Noah",
    "Zara",
    "Ivan",
    "Leila",
    "Diego",
    "Yuki",
    "Ethan",
    "Nadia",
    "Felix",
    "Chloe",
    "Ravi",
    "Elena",
    "Tariq",
    "Grace",
    "Jonas",
    "Aisha",
    "Marco",
    "Ingrid",
    "Kofi",
    "Lena",
    "Hugo",
    "Maya",
    "Arjun",
    "Clara",
    "Emil",
    "Fatima",
    "Oscar",
    "Rosa",
    "Samir",
    "Tessa",
    "Viktor",
    "Wen",
    "Yara",
    "Bruno",
    "Daria",
    "Elias",
    "Freya",
    "Gabriel",
    "Helga",
    "Idris",
    "Julia",
    "Kai",
    "Lucia",
    "Milo",
    "Nina",
    "Otto",
    "Paula",
    "Quinn",
    "Rafael",
    "Sara",
    "Theo",
    "Uma",
    "Vera",
    "Will",
    "Ximena",
    "Yusuf",
    "Zoe",
    "Anton",
    "Bianca",
    "Carlos",
    "Dina",
    "Erik",
    "Farah",
    "Goran",
    "Iris",
    "Jamal",
    "Keiko",
    "Luis",
    "Mira",
)
LAST_NAMES = (
    "Chen",
    "Novak",
    "Okafor",
    "Silva",
    "Tanaka",
    "Moreau",
    "Kowalski",
    "Haddad",
    "Lindqvist",
    "Patel",
    "Rossi",
    "Murphy",
    "Nakamura",
    "Fischer",
    "Costa",
    "Ivanova",
    "Mensah",
    "Dubois",
    "Park",
    "Jensen",
    "Alvarez",
    "Berg",
    "Kim",
    "Nguyen",
    "Schmidt",
    "Khan",
    "Lopez",
    "Sato",
    "Hughes",
    "Romano",
    "Petrov",
    "Adeyemi",
    "Larsen",
    "Morales",
    "Weber",
    "Singh",
    "Ortiz",
    "Yilmaz",
    "Brennan",
    "Castillo",
    "Horvat",
    "Ito",
    "Mbeki",
    "Quinlan",
    "Reyes",
    "Sorensen",
    "Vargas",
    "Walsh",
    "Zhou",
    "Abbott",
    "Bauer",
    "Darko",
    "Egan",
    "Fontaine",
    "Garcia",
    "Holm",
    "Iqbal",
    "Keller",
    "Li",
    "Mendes",
)
UNIVERSITIES = (
    "Rice University",
    "MIT",
    "Stanford",
    "Oxford",
    "Cambridge",
    "ETH Zurich",
    "Kyoto University",
    "UCLA",
    "McGill",
    "Yale",
    "Princeton",
    "Tsinghua",
    "Peking University",
    "Sorbonne",
    "TU Munich",
    "Duke",
    "Cornell",
    "Columbia",
    "Brown",
    "Toronto",
    "Melbourne",
    "KAIST",
    "NUS",
    "Imperial College",
    "Edinburgh",
    "Uppsala",
)
INTERESTS = (
    "chess",
    "hiking",
    "jazz",
    "painting",
    "robotics",
    "poetry",
    "tennis",
    "astronomy",
    "cooking",
    "chemistry",
    "sailing",
    "photography",
    "history",
    "coding",
    "football",
    "violin",
    "gardening",
    "climbing",
    "film",
    "economics",
    "dance",
    "biology",
    "travel",
    "swimming",
    "debate",
    "pottery",
    "cycling",
    "linguistics",
    "running",
    "theatre",
    "piano",
    "geology",
    "design",
    "yoga",
    "birding",
    "volunteering",
)
INTROS = (
    "I build small robots on weekends.",
    "I want to teach one day.",
    "I love long walks and good books.",
    "I started a coding club last year.",
    "I dream of working in space research.",
    "I enjoy solving puzzles.",
    "I run a small food blog.",
    "I like fixing old bikes.",
    "I volunteer at the city library.",
    "I hope to start my own company.",
    "I am learning my fourth language.",
    "I play in a student band.",
    "I care about clean energy.",
    "I collect maps from old atlases.",
    "I mentor first-year students.",
    "I study best late at night.",
    "I want to become a doctor.",
    "I grew up on a farm.",
    "I have visited twenty countries.",
    "I write short stories for fun.",
    "I am curious about everything.",
    "I enjoy teamwork more than anything.",
    "I train for a marathon.",
    "I like quiet mornings and coffee.",
    "I spend summers as a camp leader.",
    "I research coral reefs.",
    "I design board games.",
    "I am happiest outdoors.",
    "I organise charity runs.",
    "I like to take things apart.",
)

GPA_MIN_HUNDREDTHS = 200  # GPAs are 2.00 .. 4.00 in steps of 0.01
GPA_MAX_HUNDREDTHS = 400
MAX_RANGE_SLACK_HUNDREDTHS = 15  # how far each end of the asked range may sit from the target GPA


def format_gpa(gpa: float) -> str:
    return f"{gpa:.2f}"


def student_line(student: dict) -> str:
    """One compact resume line, as it appears in the prompt."""
    interests = " and ".join(student["interests"])
    return (
        f"{student['name']}: age {student['age']}, {student['university']}, GPA {format_gpa(student['gpa'])}, "
        f'likes {interests}. "{student["intro"]}"'
    )


def question_text(students: list, gpa_range: list) -> str:
    lo, hi = gpa_range
    resumes = "\n".join(student_line(s) for s in students)
    return (
        f"Below are the resumes of {len(students)} students.\n{resumes}\n"
        f"Question: Which student has a GPA between {format_gpa(lo)} and {format_gpa(hi)} (inclusive)?"
    )


def _sample_students(rng: random.Random, num_students: int) -> list:
    full_names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], num_students)
    gpas = rng.sample(range(GPA_MIN_HUNDREDTHS, GPA_MAX_HUNDREDTHS + 1), num_students)
    return [
        {
            "name": name,
            "age": rng.randint(18, 29),
            "university": rng.choice(UNIVERSITIES),
            "gpa": gpa / 100,
            "interests": rng.sample(INTERESTS, 2),
            "intro": rng.choice(INTROS),
        }
        for name, gpa in zip(full_names, gpas)
    ]


def _unique_range(rng: random.Random, students: list) -> tuple:
    """Pick a target student and a range [lo, hi] (hundredths) containing its GPA and no other student's.

    Only targets with room on at least one side are eligible, so lo < hi always holds."""
    gpas = sorted(round(s["gpa"] * 100) for s in students)
    candidates = []
    for i, gpa in enumerate(gpas):
        room_below = gpa - gpas[i - 1] - 1 if i > 0 else MAX_RANGE_SLACK_HUNDREDTHS
        room_above = gpas[i + 1] - gpa - 1 if i + 1 < len(gpas) else MAX_RANGE_SLACK_HUNDREDTHS
        if room_below + room_above > 0:
            candidates.append(
                (gpa, min(room_below, MAX_RANGE_SLACK_HUNDREDTHS), min(room_above, MAX_RANGE_SLACK_HUNDREDTHS))
            )
    target, room_below, room_above = rng.choice(candidates)
    while True:
        lo, hi = target - rng.randint(0, room_below), target + rng.randint(0, room_above)
        if lo < hi:
            return target, lo, hi


def make_retrieval_row(num_students: int, seed: int, index: int) -> dict:
    rng = random.Random(f"retrieval:{seed}:{num_students}:{index}")
    students = _sample_students(rng, num_students)
    target, lo, hi = _unique_range(rng, students)
    gpa_range = [lo / 100, hi / 100]
    answer = next(s for s in students if round(s["gpa"] * 100) == target)
    return {
        "prompt": question_text(students, gpa_range),
        "gold_keys": answer["name"],
        "gold_values": format_gpa(answer["gpa"]),
        "num_students": num_students,
        "students": students,
        "gpa_range": gpa_range,
        "_id": f"retrieval-{num_students}-{seed}-{index}",
    }


def make_retrieval_rows(num_students: int, num_rows: int, seed: int) -> list:
    """`num_rows` rows of `num_students` students each; deterministic for a seed."""
    max_students = min(len(FIRST_NAMES) * len(LAST_NAMES), GPA_MAX_HUNDREDTHS - GPA_MIN_HUNDREDTHS + 1)
    if not 2 <= num_students <= max_students:
        raise ValueError(f"num_students must be in [2, {max_students}], got {num_students}")
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    return [make_retrieval_row(num_students, seed, i) for i in range(num_rows)]


def write_jsonl(rows: list, path) -> None:
    """One JSON object per line, UTF-8, insertion order kept: the same rows always give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_students", type=int, required=True)
    parser.add_argument("--num_rows", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--output", required=True, help="jsonl file to write (e.g. data/generated/retrieval_30.jsonl)")
    args = parser.parse_args(argv)
    try:
        rows = make_retrieval_rows(args.num_students, args.num_rows, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_jsonl(rows, args.output)
    print(f"wrote {len(rows)} rows of {args.num_students} students to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
