"""Datasets the project generates itself, so that demos and tests need no download.

``builtin:topics`` is a synthetic English topic-classification set: short news-like sentences about
business, health, science or sports. Each sentence is built from a template, two or three words of its
topic's vocabulary (real English topic words, so a pretrained sentence encoder separates them) and
neutral filler shared by every topic. To keep it learnable but not trivial, about 20 % of the sentences
swap one topic word for a word of another topic and about 3 % carry a wrong label.

``builtin:topics-instructions`` holds the same sentences as an instruction-tuning set
(``prompt`` / ``response``) for causal language models.

``builtin:topics-preferences`` holds them as preference pairs (``prompt`` / ``chosen`` / ``rejected``): the chosen
reply names the sentence's topic; the rejected reply names another topic in half of the pairs (only the topic
words of the prompt tell which is right) and is an evasive reply ("unsure", "no idea", ...) in the other half (a
preference for answering, which even a tiny model learns in a few steps).

The frames are fixed: they are generated from an internal seed, and the ``seed`` argument of
:func:`load_builtin` is ignored, so every process of a federation sees exactly the same rows.
Shuffling and sub-sampling are the job of :mod:`fedfm.data` (which uses the federation's seed).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pandas as pd

from fedfm.errors import DataError

TOPICS = ("business", "health", "science", "sports")

_ROWS_PER_TOPIC = 600
_MIX_RATE = 0.20
_NOISE_RATE = 0.03
_INTERNAL_SEED = 20240611
# builtin:topics-preferences: the share of pairs that reject another topic (the rest reject an evasive reply)
_WRONG_TOPIC_RATE = 0.5
_EVASIVE_REPLIES = ("unsure", "no idea", "hard to say", "it depends")

_VOCABULARY: dict[str, tuple[str, ...]] = {
    "business": (
        "stock market", "shareholders", "quarterly earnings", "investors", "profit forecast",
        "merger", "acquisition", "startup", "chief executive", "dividend", "interest rates",
        "central bank", "bank loans", "retailer", "supply chain", "bond market", "trade deal",
        "import tariffs", "sales figures", "exports", "factory orders", "corporate budget",
        "consumer spending", "hedge fund", "bankruptcy filing", "stock offering", "economy",
        "inflation", "board of directors", "annual revenue", "share price", "layoffs",
        "wholesale prices", "currency markets", "venture capital", "tax on companies",
    ),
    "health": (
        "patients", "doctors", "hospital", "vaccine", "clinic", "nurses", "healthy diet",
        "exercise routine", "disease", "infection", "treatment", "therapy", "symptoms", "surgery",
        "blood pressure", "diabetes", "cancer screening", "mental health", "sleep habits",
        "nutrition", "flu season", "medication", "heart disease", "public health officials",
        "obesity", "virus outbreak", "immune system", "pharmacy", "chronic pain", "physician",
        "medical checkup", "allergies", "epidemic", "emergency room", "vitamins", "dentist",
    ),
    "science": (
        "researchers", "scientists", "laboratory", "experiment", "telescope", "galaxy", "planet",
        "physics", "chemistry", "molecules", "genome", "DNA sequencing", "fossils", "climate model",
        "particle accelerator", "astronomers", "quantum computer", "spacecraft", "satellite",
        "evolution", "new species", "hypothesis", "microscope", "neutron star", "black hole",
        "robotics", "ocean currents", "volcano", "geologists", "Mars rover", "cells", "proteins",
        "biologists", "peer-reviewed journal", "chemical reaction", "solar system",
    ),
    "sports": (
        "team", "coach", "players", "match", "tournament", "championship", "league", "goal",
        "season opener", "stadium", "fans", "striker", "goalkeeper", "quarterback", "touchdown",
        "basketball", "football", "tennis", "Olympics", "gold medal", "race", "marathon",
        "referee", "playoffs", "World Cup", "transfer window", "head coach", "home run", "pitcher",
        "cricket", "golf", "cycling", "final score", "defender", "trophy", "athletes",
    ),
}

_OPENERS = (
    "On Monday,", "Late last week,", "According to a local newspaper,", "In a statement released today,",
    "For the second time this year,", "Early this morning,", "After a long weekend,", "Once again,",
    "By the end of the day,", "In an interview,", "As expected,", "Surprisingly,", "",
)
_VERBS = (
    "drew a lot of attention", "changed quickly", "surprised many people", "stayed in the news",
    "made headlines", "was discussed widely", "raised new questions", "caught people off guard",
    "got a lot of coverage", "was the main story", "kept everyone talking", "looked uncertain",
)
_CLOSERS = (
    "", "", " across the country", " in the city", " this year", " for many families", " once more",
    " according to officials", " in recent weeks", " despite the rain", " on social media",
)

# {o} opener, {v} neutral verb phrase, {c} closer, {a}/{b}/{x} topic words (x only in 3-word templates).
_TEMPLATES = (
    "{o} the {a} {v}{c}, and the {b} was mentioned as well.",
    "{o} news about the {a} and the {b} {v}{c}.",
    "{o} people kept asking about the {a} after a report on the {b}{c}.",
    "{o} a story on the {a} {v}, with the {b} and the {x} close behind{c}.",
    "{o} the {a}, the {b} and the {x} {v}{c}.",
    "{o} everyone was talking about the {a}{c}; the {b} {v}.",
    "{o} a new report links the {a} to the {b}{c}.",
    "{o} the latest update on the {a} {v}, as did the {b}{c}.",
    "{o} the {a} {v} while the {b} and the {x} were debated{c}.",
    "{o} experts commented on the {a} and the {b}{c}.",
)


def _sentence(rng: random.Random, topic: str) -> str:
    template = rng.choice(_TEMPLATES)
    slots = ["a", "b", "x"] if "{x}" in template else ["a", "b"]
    words = rng.sample(_VOCABULARY[topic], len(slots))
    if rng.random() < _MIX_RATE:
        other = rng.choice([name for name in TOPICS if name != topic])
        # The first slot keeps its own topic, so a mixed sentence still leans towards its label.
        words[rng.randrange(1, len(slots))] = rng.choice(_VOCABULARY[other])
    text = template.format(o=rng.choice(_OPENERS), v=rng.choice(_VERBS), c=rng.choice(_CLOSERS),
                           **dict(zip(slots, words)))
    text = text.strip()
    return text[0].upper() + text[1:]


def _topics_rows() -> list[tuple[str, str]]:
    rng = random.Random(_INTERNAL_SEED)
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    for topic in TOPICS:
        made = 0
        while made < _ROWS_PER_TOPIC:
            text = _sentence(rng, topic)
            if text in seen:  # keep sentences unique so a train/eval split never shares a row
                continue
            seen.add(text)
            made += 1
            label = topic
            if rng.random() < _NOISE_RATE:
                label = rng.choice([name for name in TOPICS if name != topic])
            rows.append((text, label))
    rng.shuffle(rows)
    return rows


def topics() -> pd.DataFrame:
    """``text`` / ``label`` rows (2,400; 4 labels), always the same frame."""
    rows = _topics_rows()
    return pd.DataFrame({"text": [text for text, _ in rows], "label": [label for _, label in rows]})


def topics_instructions() -> pd.DataFrame:
    """The ``topics`` sentences as ``prompt`` / ``response`` pairs for instruction tuning."""
    rows = _topics_rows()
    return pd.DataFrame({
        "prompt": [f"Classify the topic of: {text}\nTopic:" for text, _ in rows],
        "response": [f" {label}" for _, label in rows],
    })


def topics_preferences() -> pd.DataFrame:
    """The ``topics`` sentences as ``prompt`` / ``chosen`` / ``rejected`` pairs: the labelled topic is chosen over,
    in half of the rows (drawn from an internal seed), another topic, and in the other half an evasive reply."""
    rows = _topics_rows()
    rng = random.Random(_INTERNAL_SEED + 1)
    rejected = [rng.choice([name for name in TOPICS if name != label]) if rng.random() < _WRONG_TOPIC_RATE
                else rng.choice(_EVASIVE_REPLIES) for _, label in rows]
    return pd.DataFrame({
        "prompt": [f"Classify the topic of: {text}\nTopic:" for text, _ in rows],
        "chosen": [f" {label}" for _, label in rows],
        "rejected": [f" {reply}" for reply in rejected],
    })


BUILTINS: dict[str, Callable[[], pd.DataFrame]] = {
    "topics": topics,
    "topics-instructions": topics_instructions,
    "topics-preferences": topics_preferences,
}


def load_builtin(name: str, seed: int = 0) -> pd.DataFrame:
    """The built-in dataset ``name`` (as in ``builtin:NAME``).

    ``seed`` is accepted for interface symmetry and ignored: built-in datasets are fixed frames.
    """
    del seed  # documented: the frames do not depend on it
    try:
        make = BUILTINS[name]
    except KeyError:
        raise DataError(
            f"unknown built-in dataset 'builtin:{name}'; built-ins are: "
            + ", ".join(f"builtin:{known}" for known in BUILTINS)
        ) from None
    return make()
