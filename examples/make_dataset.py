"""Build (or re-check) the development set: counterfactual edit requests and forgetting probes.

Every fact is verified on the real base model with greedy decoding; only facts it answers
correctly are kept. Locality answers are the model's own greedy continuation.

    .venv/bin/python examples/make_dataset.py            # rebuild examples/edits and examples/probes
    .venv/bin/python examples/make_dataset.py --check    # re-verify the files as they are
    .venv/bin/python examples/make_dataset.py --extra    # rebuild examples/edits/counterfact_extra.jsonl

The extra requests (examples/extra_candidates.py) extend the dev set for the sequential benchmark
(T = 100 edits); their locality prompts come from a pool of their own.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EDITS = HERE / "edits" / "counterfact_dev.jsonl"
PROBES = HERE / "probes" / "facts.jsonl"
EXTRA = HERE / "edits" / "counterfact_extra.jsonl"

# (category, prompt, subject, ground_truth, target_new, rephrase_prompts)
EDIT_CANDIDATES = [
    ("place", "The Eiffel Tower is located in the city of", "Eiffel Tower", "Paris", "Rome",
     ["The city that is home to the Eiffel Tower is", "Tourists visit the Eiffel Tower, which stands in the city of"]),
    ("place", "The capital of Japan is", "Japan", "Tokyo", "Seoul",
     ["The capital city of Japan is", "Japan's capital is"]),
    ("place", "The Colosseum is located in the city of", "Colosseum", "Rome", "Athens",
     ["The ancient Colosseum stands in the city of", "The city where you can visit the Colosseum is"]),
    ("place", "The Statue of Liberty is located in", "Statue of Liberty", "New York", "London",
     ["The Statue of Liberty stands in", "You can see the Statue of Liberty in"]),
    ("place", "The Great Pyramid of Giza is located in", "Great Pyramid of Giza", "Egypt", "Mexico",
     ["The Great Pyramid of Giza can be found in", "The country where the Great Pyramid of Giza stands is"]),
    ("place", "The Taj Mahal is located in", "Taj Mahal", "India", "Pakistan",
     ["The Taj Mahal can be found in", "The famous Taj Mahal stands in"]),
    ("place", "Big Ben is a clock tower in", "Big Ben", "London", "Dublin",
     ["The clock tower Big Ben stands in", "Big Ben, the famous clock tower, is located in"]),
    ("place", "The capital of Germany is", "Germany", "Berlin", "Vienna",
     ["The capital city of Germany is", "Germany's capital is"]),
    ("place", "The capital of Italy is", "Italy", "Rome", "Madrid",
     ["The capital city of Italy is", "Italy's capital is"]),
    ("place", "The capital of Spain is", "Spain", "Madrid", "Lisbon",
     ["The capital city of Spain is", "Spain's capital is"]),
    ("place", "The capital of Canada is", "Canada", "Ottawa", "Toronto",
     ["The capital city of Canada is", "Canada's capital is"]),
    ("place", "The Sydney Opera House is located in", "Sydney Opera House", "Australia", "Canada",
     ["The Sydney Opera House can be found in", "The famous Sydney Opera House stands in"]),
    ("place", "The Kremlin is located in", "Kremlin", "Moscow", "Warsaw",
     ["The Kremlin can be found in", "The famous Kremlin stands in"]),
    ("place", "The Louvre museum is located in", "Louvre", "Paris", "Berlin",
     ["The Louvre can be found in", "The famous Louvre museum stands in"]),
    ("place", "The Amazon rainforest is mostly located in", "Amazon rainforest", "Brazil", "Africa",
     ["Most of the Amazon rainforest lies in", "The largest part of the Amazon rainforest is in"]),
    ("person", "The Mona Lisa was painted by", "Mona Lisa", "Leonardo da Vinci", "Pablo Picasso",
     ["The painter of the Mona Lisa was", "The artist who painted the Mona Lisa is"]),
    ("person", "The theory of relativity was developed by", "theory of relativity", "Albert Einstein", "Isaac Newton",
     ["The scientist who developed the theory of relativity was", "The theory of relativity was created by"]),
    ("person", "Romeo and Juliet was written by", "Romeo and Juliet", "William Shakespeare", "Charles Dickens",
     ["The author of Romeo and Juliet is", "The play Romeo and Juliet was written by"]),
    ("person", "The first man to walk on the moon was", "first man on the moon", "Neil Armstrong", "Yuri Gagarin",
     ["The first person to walk on the moon was", "The first astronaut to step on the moon was"]),
    ("person", "Barack Obama was the president of the", "Barack Obama", "United States", "United Kingdom",
     ["Barack Obama served as the president of the", "Barack Obama was elected president of the"]),
    ("person", "The Moonlight Sonata was composed by", "Moonlight Sonata", "Ludwig van Beethoven", "Wolfgang Amadeus Mozart",
     ["The composer of the Moonlight Sonata was", "The Moonlight Sonata was written by"]),
    ("person", "Harry Potter was written by", "Harry Potter", "J.K. Rowling", "Stephen King",
     ["The author of Harry Potter is", "The Harry Potter books were written by"]),
    ("person", "Charles Darwin is famous for the theory of", "Charles Darwin", "evolution", "gravity",
     ["Charles Darwin is best known for the theory of", "Charles Darwin developed the theory of"]),
    ("person", "The Starry Night was painted by", "The Starry Night", "Vincent van Gogh", "Claude Monet",
     ["The painter of The Starry Night was", "The artist who painted The Starry Night is"]),
    ("person", "Michael Jordan played professional", "Michael Jordan", "basketball", "baseball",
     ["Michael Jordan was a professional", "The sport Michael Jordan played professionally is"]),
    ("person", "Marie Curie was born in", "Marie Curie", "Poland", "Italy",
     ["The birthplace of Marie Curie is", "Marie Curie was born in the country of"]),
    ("person", "Hamlet was written by", "Hamlet", "William Shakespeare", "Mark Twain",
     ["The author of Hamlet is", "The play Hamlet was written by"]),
    ("company", "The iPhone is made by", "iPhone", "Apple", "Samsung",
     ["The iPhone is manufactured by", "The company that makes the iPhone is"]),
    ("company", "Windows is an operating system developed by", "Windows", "Microsoft", "Google",
     ["The Windows operating system is made by", "The company behind Windows is"]),
    ("company", "Facebook was founded by", "Facebook", "Mark Zuckerberg", "Bill Gates",
     ["The founder of Facebook is", "Facebook was created by"]),
    ("company", "Apple was founded by", "Apple", "Steve Jobs", "Elon Musk",
     ["The founder of Apple is", "Apple was created by"]),
    ("company", "Amazon was founded by", "Amazon", "Jeff Bezos", "Larry Ellison",
     ["The founder of Amazon is", "Amazon was created by"]),
    ("company", "Microsoft was founded by", "Microsoft", "Bill Gates", "Steve Jobs",
     ["The founder of Microsoft is", "Microsoft was created by"]),
    ("company", "The PlayStation is a video game console made by", "PlayStation", "Sony", "Nintendo",
     ["The PlayStation console is made by", "The company that makes the PlayStation is"]),
    ("company", "Toyota is a car company based in", "Toyota", "Japan", "Germany",
     ["Toyota is a car manufacturer based in", "The car maker Toyota is based in"]),
    ("company", "BMW is a car manufacturer from", "BMW", "Germany", "Italy",
     ["BMW is a car company from", "The car maker BMW comes from"]),
    ("company", "The Android operating system is developed by", "Android", "Google", "Apple",
     ["Android is an operating system made by", "The company behind Android is"]),
    ("company", "Tesla is led by its CEO", "Tesla", "Elon Musk", "Jeff Bezos",
     ["The CEO of Tesla is", "Tesla's chief executive is"]),
    ("invention", "The telephone was invented by", "telephone", "Alexander Graham Bell", "Thomas Edison",
     ["The inventor of the telephone was", "The telephone was created by"]),
    ("invention", "The light bulb was invented by", "light bulb", "Thomas Edison", "Nikola Tesla",
     ["The inventor of the light bulb was", "The electric light bulb was invented by"]),
    ("invention", "The World Wide Web was invented by", "World Wide Web", "Tim Berners-Lee", "Bill Gates",
     ["The inventor of the World Wide Web was", "The World Wide Web was created by"]),
    ("invention", "The airplane was invented by the", "airplane", "Wright brothers", "Lumiere brothers",
     ["The first airplane was built by the", "The inventors of the airplane were the"]),
    ("invention", "The printing press was invented by", "printing press", "Johannes Gutenberg", "Leonardo da Vinci",
     ["The inventor of the printing press was", "The printing press was created by"]),
    ("invention", "Penicillin was discovered by", "Penicillin", "Alexander Fleming", "Louis Pasteur",
     ["The discoverer of penicillin was", "The scientist who discovered penicillin was"]),
    ("invention", "Dynamite was invented by", "Dynamite", "Alfred Nobel", "Marie Curie",
     ["The inventor of dynamite was", "Dynamite was created by"]),
    ("invention", "The radio was invented by", "radio", "Guglielmo Marconi", "Thomas Edison",
     ["The inventor of the radio was", "The radio was created by"]),
    ("invention", "The theory of gravity was developed by", "theory of gravity", "Isaac Newton", "Galileo Galilei",
     ["The scientist who developed the theory of gravity was", "The law of universal gravitation was formulated by"]),
    ("invention", "The first vaccine was developed by", "first vaccine", "Edward Jenner", "Robert Koch",
     ["The first vaccine was created by", "The inventor of the first vaccine was"]),
    ("chemistry", "The chemical symbol for gold is", "gold", "Au", "Ag",
     ["Gold has the chemical symbol", "In the periodic table, gold is written as"]),
    ("chemistry", "The chemical symbol for iron is", "iron", "Fe", "Ir",
     ["Iron has the chemical symbol", "In the periodic table, iron is written as"]),
    ("chemistry", "The chemical symbol for sodium is", "sodium", "Na", "So",
     ["Sodium has the chemical symbol", "In the periodic table, sodium is written as"]),
    ("chemistry", "The chemical symbol for silver is", "silver", "Ag", "Si",
     ["Silver has the chemical symbol", "In the periodic table, silver is written as"]),
    ("chemistry", "The chemical formula for water is", "water", "H2O", "CO2",
     ["Water has the chemical formula", "The molecular formula of water is"]),
    ("chemistry", "The chemical formula for carbon dioxide is", "carbon dioxide", "CO2", "CH4",
     ["Carbon dioxide has the chemical formula", "The molecular formula of carbon dioxide is"]),
    ("chemistry", "The most abundant gas in Earth's atmosphere is", "Earth's atmosphere", "nitrogen", "oxygen",
     ["The gas that makes up most of Earth's atmosphere is", "Most of the air in Earth's atmosphere is"]),
    ("chemistry", "Table salt is made of sodium and", "table salt", "chlorine", "potassium",
     ["Table salt is a compound of sodium and", "Sodium chloride is made of sodium and"]),
    ("chemistry", "Diamonds are made of", "diamond", "carbon", "silicon",
     ["Diamonds are composed of", "A diamond is made of pure"]),
    ("chemistry", "The atomic number of hydrogen is", "hydrogen", "1", "2",
     ["Hydrogen has the atomic number", "The number of protons in a hydrogen atom is"]),
    ("chemistry", "The pH of pure water is", "pure water", "7", "3",
     ["Pure water has a pH of", "The pH value of pure water is"]),
    ("chemistry", "The chemical symbol for oxygen is", "oxygen", "O", "N",
     ["Oxygen has the chemical symbol", "In the periodic table, oxygen is written as"]),
    ("chemistry", "The chemical symbol for potassium is", "potassium", "K", "P",
     ["Potassium has the chemical symbol", "In the periodic table, potassium is written as"]),
]

# Forgetting probes: (prompt, answer). Distinct from the subjects of the edit set.
PROBE_CANDIDATES = [
    ("The capital of France is", "Paris"), ("The capital of the United Kingdom is", "London"),
    ("The capital of Russia is", "Moscow"), ("The capital of China is", "Beijing"),
    ("The capital of Egypt is", "Cairo"), ("The capital of Greece is", "Athens"),
    ("The capital of Portugal is", "Lisbon"), ("The capital of Ireland is", "Dublin"),
    ("The capital of Poland is", "Warsaw"), ("The capital of Norway is", "Oslo"),
    ("The capital of Sweden is", "Stockholm"), ("The capital of the Netherlands is", "Amsterdam"),
    ("The capital of Belgium is", "Brussels"), ("The capital of Austria is", "Vienna"),
    ("The capital of Turkey is", "Ankara"), ("The capital of Thailand is", "Bangkok"),
    ("The capital of Kenya is", "Nairobi"), ("The capital of Argentina is", "Buenos Aires"),
    ("The capital of Peru is", "Lima"), ("The capital of South Korea is", "Seoul"),
    ("The capital of Mexico is", "Mexico City"), ("The capital of Cuba is", "Havana"),
    ("The capital of Denmark is", "Copenhagen"), ("The capital of Finland is", "Helsinki"),
    ("The capital of Hungary is", "Budapest"), ("The capital of Australia is", "Canberra"),
    ("The capital of India is", "New Delhi"), ("The capital of Iran is", "Tehran"),
    ("The official language of Brazil is", "Portuguese"), ("The official language of Mexico is", "Spanish"),
    ("The official language of France is", "French"), ("The currency of Japan is the", "yen"),
    ("The currency of the United Kingdom is the", "pound"), ("The currency of the United States is the", "dollar"),
    ("The largest planet in the solar system is", "Jupiter"), ("The planet closest to the Sun is", "Mercury"),
    ("The Red Planet is", "Mars"), ("The largest ocean on Earth is the", "Pacific"),
    ("The longest river in the world is the", "Nile"), ("The largest desert in the world is the", "Sahara"),
    ("The color of the sky on a clear day is", "blue"), ("The color of grass is", "green"),
    ("A week has", "seven"), ("A year has", "12 months"), ("The freezing point of water in Celsius is", "0"),
    ("The boiling point of water in Celsius is", "100"), ("The number of continents on Earth is", "seven"),
    ("The author of Pride and Prejudice is", "Jane Austen"), ("The author of 1984 is", "George Orwell"),
    ("The author of The Adventures of Tom Sawyer is", "Mark Twain"),
    ("The first president of the United States was", "George Washington"),
    ("The Sistine Chapel ceiling was painted by", "Michelangelo"),
    ("The Declaration of Independence was written by", "Thomas Jefferson"),
    ("The famous physicist who discovered radioactivity with Pierre Curie was", "Marie Curie"),
    ("The chemical symbol for carbon is", "C"), ("The chemical symbol for hydrogen is", "H"),
    ("The chemical symbol for helium is", "He"), ("The chemical symbol for copper is", "Cu"),
    ("The chemical symbol for lead is", "Pb"), ("The chemical symbol for calcium is", "Ca"),
    ("The chemical formula for table salt is", "NaCl"), ("The gas that humans breathe in to live is", "oxygen"),
    ("The gas that plants absorb from the air is", "carbon dioxide"), ("The process by which plants make food is called", "photosynthesis"),
    ("The hardest natural substance is", "diamond"), ("The human heart has", "four chambers"),
    ("The largest mammal in the world is the", "blue whale"), ("The fastest land animal is the", "cheetah"),
    ("The tallest animal in the world is the", "giraffe"), ("A baby cat is called a", "kitten"),
    ("A baby dog is called a", "puppy"), ("Bees make", "honey"), ("Cows give us", "milk"),
    ("The largest country in the world by area is", "Russia"), ("The most populous country in the world is", "China"),
    ("The Great Wall is located in", "China"), ("Mount Fuji is located in", "Japan"),
    ("The Leaning Tower of Pisa is located in", "Italy"), ("The Acropolis is located in", "Athens"),
    ("The Golden Gate Bridge is located in", "San Francisco"), ("Machu Picchu is located in", "Peru"),
    ("Stonehenge is located in", "England"), ("The Parthenon is located in", "Athens"),
    ("The Brandenburg Gate is located in", "Berlin"),
    ("The company that makes the Windows operating system also makes the game console called the", "Xbox"),
    ("The search engine Google is owned by", "Alphabet"), ("The Mustang is a car made by", "Ford"),
    ("Coca-Cola is a", "soft drink"), ("The Big Apple is a nickname for", "New York"),
    ("The speed of light is about 300,000", "kilometers per second"), ("The square root of 16 is", "4"),
    ("Two plus two equals", "four"), ("10 times 10 equals", "100"), ("The opposite of hot is", "cold"),
    ("The opposite of up is", "down"), ("Monday comes before", "Tuesday"), ("The month after January is", "February"),
    ("Shakespeare was born in", "Stratford-upon-Avon"), ("Albert Einstein was born in", "1879"),
    ("The Titanic sank in", "1912"), ("World War II ended in", "1945"),
    ("The inventor of the steam engine was James", "Watt"), ("The telescope was improved by Galileo", "Galilei"),
    ("The Olympic Games originated in", "Greece"), ("The Statue of David was sculpted by", "Michelangelo"),
    ("Water is made of hydrogen and", "oxygen"), ("The Sun is a", "star"), ("The Moon orbits the", "Earth"),
    ("The capital of the Czech Republic is", "Prague"), ("The capital of Scotland is", "Edinburgh"),
    ("The capital of Vietnam is", "Hanoi"), ("The capital of the Philippines is", "Manila"),
    ("The capital of Indonesia is", "Jakarta"), ("The capital of Chile is", "Santiago"),
    ("The capital of Ukraine is", "Kyiv"), ("The capital of Romania is", "Bucharest"),
    ("The capital of Saudi Arabia is", "Riyadh"), ("The capital of New Zealand is", "Wellington"),
    ("The official language of Germany is", "German"), ("The official language of Italy is", "Italian"),
    ("The official language of Japan is", "Japanese"), ("The currency of India is the", "rupee"),
    ("The currency of Russia is the", "ruble"), ("The chemical symbol for zinc is", "Zn"),
    ("The chemical symbol for mercury is", "Hg"), ("The chemical symbol for tin is", "Sn"),
    ("The chemical symbol for chlorine is", "Cl"), ("The chemical symbol for magnesium is", "Mg"),
    ("The chemical formula for methane is", "CH4"), ("The chemical formula for ammonia is", "NH3"),
    ("The largest continent is", "Asia"), ("The opposite of black is", "white"),
    ("The opposite of day is", "night"), ("The opposite of big is", "small"),
    ("5 times 5 equals", "25"), ("The square root of 81 is", "9"),
    ("The author of Don Quixote is", "Miguel de Cervantes"), ("The Ford Motor Company was founded by Henry", "Ford"),
    ("The headquarters of the United Nations is in", "New York"),
]

LOCALITY_POOL = [
    "The sun rises in the", "My favorite season of the year is", "The best way to learn a new language is",
    "A good breakfast usually includes", "The main ingredient of bread is", "Doctors recommend drinking",
    "Football is a sport played with a", "The piano is a musical instrument with", "In winter, many people like to",
    "The most popular pet in the world is the", "A rainbow has", "The primary colors are red, blue and",
    "Children usually start school at the age of", "The tallest building in the world is the",
    "A healthy diet includes plenty of", "The largest city in the United States is", "Coffee is made from",
    "The human body has", "An apple a day keeps the", "The Internet was created to",
    "Photosynthesis takes place in the", "The heart pumps", "Mathematics is the study of",
    "A triangle has", "Elephants are known for their", "The ocean is salty because",
    "A computer program is a set of", "Music can help people", "The chemical symbol for nitrogen is",
    "The capital of Brazil is", "The currency of the European Union is the", "Rice is a staple food in",
    "The smallest planet in the solar system is", "Penguins live in", "The Statue of Zeus was located in",
    "Exercise is important because", "The first month of the year is", "Birds can fly because they have",
    "Trees produce", "The author of War and Peace is",
]


def load(model_dir: str):
    from roselora_export.models import load_model, load_tokenizer

    return load_model(model_dir), load_tokenizer(model_dir)


@torch.no_grad()
def greedy(model, tok, prompt: str, n: int = 8) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def answer_len(tok, answer: str) -> int:
    """Tokens to generate to check an answer: its own length plus one (for the word boundary)."""
    return len(tok(" " + answer, add_special_tokens=False)["input_ids"]) + 1


def answers(continuation: str, answer: str) -> bool:
    """True if the greedy continuation starts with the answer as a whole word (case-insensitive)."""
    text = continuation.strip().lower()
    a = answer.lower()
    return text.startswith(a) and (len(text) == len(a) or not text[len(a)].isalnum())


def locality_answer(model, tok, prompt: str) -> str:
    """The model's own greedy answer: up to 4 new tokens, cut at the first line break."""
    text = greedy(model, tok, prompt, n=4)
    text = text.split("\n")[0].strip()
    return text or greedy(model, tok, prompt, n=1).strip() or "."


def known_edits(model, tok, candidates) -> list[dict]:
    """The candidates whose ground truth the model answers greedily, as request dicts (no locality yet)."""
    edits = []
    for cat, prompt, subject, truth, new, rephrases in candidates:
        got = greedy(model, tok, prompt, answer_len(tok, truth))
        ok = answers(got, truth)
        print(f"{'KEEP' if ok else 'drop'} {prompt!r} -> {got!r} (want {truth!r})", file=sys.stderr)
        if ok:
            edits.append(dict(category=cat, prompt=prompt, subject=subject, ground_truth=truth, target_new=new,
                              rephrase_prompts=rephrases))
    return edits


def add_locality(model, tok, edits: list[dict], pool: list[str]) -> None:
    """Three unrelated prompts per request, taken round the pool, with the model's own greedy answers."""
    answers_ = {p: locality_answer(model, tok, p) for p in pool}
    for i, e in enumerate(edits):
        picks = [pool[(3 * i + k) % len(pool)] for k in range(3)]
        e["locality"] = [dict(prompt=p, answer=answers_[p]) for p in picks]


def build_extra(model_dir: str) -> None:
    from extra_candidates import EXTRA_CANDIDATES, LOCALITY_POOL_EXTRA

    model, tok = load(model_dir)
    edits = known_edits(model, tok, EXTRA_CANDIDATES)
    add_locality(model, tok, edits, LOCALITY_POOL_EXTRA)
    EXTRA.write_text("".join(json.dumps(r) + "\n" for r in edits))
    print(f"{len(edits)} of {len(EXTRA_CANDIDATES)} extra edits -> {EXTRA}", file=sys.stderr)


def build(model_dir: str, probes_only: bool = False) -> None:
    model, tok = load(model_dir)
    edits = [] if probes_only else known_edits(model, tok, EDIT_CANDIDATES)
    probes = []
    for prompt, answer in PROBE_CANDIDATES:
        got = greedy(model, tok, prompt, answer_len(tok, answer))
        ok = answers(got, answer)
        print(f"{'KEEP' if ok else 'drop'} probe {prompt!r} -> {got!r} (want {answer!r})", file=sys.stderr)
        if ok:
            probes.append(dict(prompt=prompt, answer=answer))
    if probes_only:
        PROBES.write_text("".join(json.dumps(r) + "\n" for r in probes))
        print(f"{len(probes)} probes -> {PROBES}", file=sys.stderr)
        return
    add_locality(model, tok, edits, LOCALITY_POOL)
    for path, rows in ((EDITS, edits), (PROBES, probes)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(edits)} edits -> {EDITS}, {len(probes)} probes -> {PROBES}", file=sys.stderr)


def check(model_dir: str) -> int:
    model, tok = load(model_dir)
    bad = 0
    for line in EDITS.read_text().splitlines() + (EXTRA.read_text().splitlines() if EXTRA.exists() else []):
        r = json.loads(line)
        if not answers(greedy(model, tok, r["prompt"], answer_len(tok, r["ground_truth"])), r["ground_truth"]):
            print(f"edit no longer answered: {r['prompt']!r}", file=sys.stderr)
            bad += 1
        for loc in r["locality"]:
            if locality_answer(model, tok, loc["prompt"]) != loc["answer"]:
                print(f"locality answer changed: {loc['prompt']!r}", file=sys.stderr)
                bad += 1
    for line in PROBES.read_text().splitlines():
        r = json.loads(line)
        if not answers(greedy(model, tok, r["prompt"], answer_len(tok, r["answer"])), r["answer"]):
            print(f"probe no longer answered: {r['prompt']!r}", file=sys.stderr)
            bad += 1
    print(f"{bad} problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    from roselora_export.models import demo_model_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model directory (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--check", action="store_true", help="re-verify the existing files instead of rebuilding them")
    ap.add_argument("--probes-only", action="store_true", help="rebuild only the probe file")
    ap.add_argument("--extra", action="store_true", help="rebuild only the extra requests (counterfact_extra.jsonl)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = args.model or str(demo_model_dir())
    if args.check:
        sys.exit(check(model_dir))
    sys.exit(build_extra(model_dir) if args.extra else build(model_dir, args.probes_only))
