"""`builtin:world-facts`: general knowledge a real pretrained model already has (capitals, chemical
symbols, authors, simple science), to watch what fine-tuning does to it after every stage. It is
a knowledge domain (evaluated on all its rows) scored by word match: a chat model answers in a
sentence, so an answer counts when it holds the gold answer as a whole word.

hft_ray.data.domains makes the rows: a model with a chat template is asked each question as one
user turn in its own template; a model without one reads hft-ray's plain rendering
("user: ...\nassistant: ") with the answer begun by the sentence's prefix. A character-level
built-in model knows none of them.
"""

from __future__ import annotations

# (sentence prefix, question, answer); benchmarks/knowledge.py counts any of the alternatives "a|b"
# in an answer; the domain's rows keep the first.
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Russia", "Moscow"), ("the United Kingdom", "London"), ("Egypt", "Cairo"), ("China", "Beijing"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
            ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Canada", "Ottawa"),
            ("Australia", "Canberra"), ("Kenya", "Nairobi"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
            ("Thailand", "Bangkok"), ("South Korea", "Seoul"), ("Cuba", "Havana"), ("Hungary", "Budapest")]
SYMBOLS = [("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"), ("oxygen", "O"), ("hydrogen", "H"),
           ("carbon", "C"), ("helium", "He"), ("potassium", "K"), ("lead", "Pb"), ("copper", "Cu"),
           ("nitrogen", "N"), ("calcium", "Ca"), ("mercury", "Hg"), ("tin", "Sn")]
AUTHORS = [("Romeo and Juliet", "Shakespeare"), ("Hamlet", "Shakespeare"), ("Pride and Prejudice", "Austen"),
           ("1984", "Orwell"), ("Animal Farm", "Orwell"), ("War and Peace", "Tolstoy"), ("Don Quixote", "Cervantes"),
           ("The Origin of Species", "Darwin"), ("Oliver Twist", "Dickens"), ("A Christmas Carol", "Dickens"),
           ("The Odyssey", "Homer"), ("Harry Potter", "Rowling"), ("The Divine Comedy", "Dante"),
           ("Moby-Dick", "Melville"), ("Crime and Punishment", "Dostoevsky")]
SCIENCE = [
    ("The largest planet in the solar system is", "What is the largest planet in the solar system?", "Jupiter"),
    ("The planet closest to the Sun is", "Which planet is closest to the Sun?", "Mercury"),
    ("The planet known as the Red Planet is", "Which planet is known as the Red Planet?", "Mars"),
    ("Water is made of hydrogen and", "Water is made of hydrogen and which other element?", "oxygen"),
    ("The chemical formula of water is", "What is the chemical formula of water?", "H2O"),
    ("Plants take in carbon dioxide and release", "What gas do plants release during photosynthesis?", "oxygen"),
    ("The freezing point of water in degrees Celsius is", "At how many degrees Celsius does water freeze?", "0|zero"),
    ("The boiling point of water in degrees Celsius is", "At how many degrees Celsius does water boil?", "100"),
    ("The force that pulls objects toward the Earth is called", "What force pulls objects toward the Earth?",
     "gravity"),
    ("The star at the center of our solar system is the", "What star is at the center of our solar system?", "Sun"),
    ("The natural satellite of the Earth is the", "What is the Earth's natural satellite called?", "Moon"),
    ("The organ that pumps blood through the body is the", "Which organ pumps blood through the body?", "heart"),
    ("The theory of relativity was developed by Albert", "Who developed the theory of relativity?", "Einstein"),
    ("The telephone was invented by Alexander Graham", "Who invented the telephone?", "Bell"),
    ("The first man to walk on the Moon was Neil", "Who was the first man to walk on the Moon?", "Armstrong"),
    ("The largest ocean on Earth is the", "What is the largest ocean on Earth?", "Pacific"),
    ("The longest river in Africa is the", "What is the longest river in Africa?", "Nile"),
    ("The tallest mountain in the world is Mount", "What is the tallest mountain in the world?", "Everest"),
    ("A triangle has three sides; a square has", "How many sides does a square have?", "four|4"),
    ("The number of days in a week is", "How many days are there in a week?", "7|seven"),
    ("The number of continents on Earth is", "How many continents are there on Earth?", "seven|7"),
    ("The Mona Lisa was painted by Leonardo da", "Who painted the Mona Lisa?", "Vinci"),
    ("The largest mammal on Earth is the blue", "What is the largest mammal on Earth?", "whale"),
    ("The hardest natural substance is", "What is the hardest natural substance?", "diamond"),
    ("Light travels faster than", "Which is faster, light or sound?", "sound"),
]
FACTS = ([(f"The capital of {c} is", f"What is the capital of {c}?", a) for c, a in CAPITALS]
         + [(f"The chemical symbol for {e} is", f"What is the chemical symbol for {e}?", s) for e, s in SYMBOLS]
         + [(f"{book} was written by", f"Who wrote {book}?", a) for book, a in AUTHORS] + SCIENCE)

# What SmolLM2-135M-Instruct got wrong at base asked in its own chat template (the question as one
# user turn, the generation prompt; greedy, 16 new tokens, word match, hft_ray.train.evaluation;
# 59 of 80 right, measured 2026-12-01; in hft-ray's old plain rendering with the answer begun it
# was 61 of 80, a partly different set): left out of the domain, so that its column starts at 1.0
# on that model and every fall is forgetting.
MISSED_BY_SMOLLM2 = frozenset({
    'The capital of Italy is',
    'The capital of Spain is',
    'The capital of Portugal is',
    'The capital of Argentina is',
    'The chemical symbol for carbon is',
    'The chemical symbol for helium is',
    '1984 was written by',
    'War and Peace was written by',
    'Don Quixote was written by',
    'The Origin of Species was written by',
    'Oliver Twist was written by',
    'Moby-Dick was written by',
    'Crime and Punishment was written by',
    'The largest planet in the solar system is',
    'The planet closest to the Sun is',
    'Water is made of hydrogen and',
    'Plants take in carbon dioxide and release',
    'The natural satellite of the Earth is the',
    'The number of continents on Earth is',
    'The hardest natural substance is',
    'Light travels faster than',
})
WORLD_FACTS = [fact for fact in FACTS if fact[0] not in MISSED_BY_SMOLLM2]
