"""The fixed tag taxonomy: everyday life-memory labels, each described in a few phrases.

Tags are chosen by embedding similarity between a note and each label's descriptions, so a
label is only as good as its descriptions: they are written the way people talk about the
topic ("my dog", "went for a run") rather than as definitions. A label's score is its best
description's cosine, which lets one label cover several distinct ways of talking about it.
A fixed list (rather than free-form LLM tags) keeps tags comparable across notes and cubes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# label -> descriptions. "smalltalk" also catches notes with no topical content at all.
TAXONOMY: dict[str, tuple[str, ...]] = {
    "family": (
        "my family, my kids, my children, my parents, mom and dad",
        "my husband or wife, my siblings, grandparents and relatives",
        "adopting a child, becoming a parent, raising kids",
    ),
    "friends": (
        "hanging out with my friends",
        "a close friend, friendship, catching up with an old friend",
    ),
    "relationships": (
        "dating, my boyfriend or girlfriend, romance and love life",
        "marriage, a breakup, getting engaged to my partner",
    ),
    "work": (
        "my job, my boss, coworkers and the office",
        "a busy day at work, a project deadline, a meeting with my team",
    ),
    "career": (
        "my career, applying for a new job, a promotion, a job interview",
        "starting my own business, changing careers, professional experience",
    ),
    "education": (
        "school, college, university classes and studying",
        "taking a course, exams, a degree, my teacher and students",
    ),
    "health": (
        "my health, feeling sick, seeing a doctor, hospital",
        "mental health, therapy, an injury, medication, self-care",
    ),
    "fitness": (
        "working out at the gym, exercise, running, yoga",
        "training for a marathon, lifting weights, staying fit",
    ),
    "food": (
        "cooking dinner, baking, a recipe",
        "eating at a restaurant, favorite food, trying new dishes",
    ),
    "travel": (
        "a trip abroad, vacation, traveling to another country",
        "flying, a road trip, visiting a new city, sightseeing",
    ),
    "home": (
        "my house, apartment, moving to a new place",
        "decorating, renovating, cleaning, my garden and backyard",
    ),
    "pets": (
        "my dog, my cat, my pet",
        "walking the dog, feeding my puppy or kitten, taking my pet to the vet",
    ),
    "hobbies": (
        "my hobby, something I do for fun in my free time",
        "crafts, pottery, knitting, collecting, board games",
    ),
    "art": (
        "painting, drawing, sculpture, an art class",
        "a museum, an exhibition, photography, my artwork",
    ),
    "music": (
        "playing guitar, piano, violin, singing, a band",
        "listening to music, a concert, a song or album",
    ),
    "books": (
        "reading a book, a novel, my favorite author",
        "a book club, the library, a good read",
    ),
    "sports": (
        "playing soccer, basketball, football, tennis",
        "watching a game, my favorite team, a sports match",
    ),
    "events": (
        "a party, a wedding, a birthday celebration",
        "a festival, a conference, a parade, a ceremony or event",
    ),
    "emotions": (
        "feeling happy, sad, excited, anxious, grateful",
        "how I feel, feeling proud, stressed, overwhelmed or lonely",
    ),
    "identity": (
        "my identity, being transgender, LGBTQ, gender and coming out",
        "my culture, religion, faith, heritage and values",
    ),
    "plans": (
        "my plans for next week, I am planning to",
        "my goals and dreams for the future",
    ),
    "finance": (
        "money, saving, budget, paying bills and debt",
        "my bank, credit card, loans, investing, salary and expenses",
    ),
    "technology": (
        "computers, software, apps, phones and gadgets",
        "programming, video games, the internet and social media",
    ),
    "nature": (
        "hiking in the mountains, the beach, the ocean, forests",
        "nature, the outdoors, wildlife, sunsets, flowers and trees",
    ),
    "smalltalk": (
        "hi, hello, how are you, good to see you",
        "thanks, that's great, sounds good, bye, take care",
    ),
}
LABELS: tuple[str, ...] = tuple(TAXONOMY)
FALLBACK_LABEL = "smalltalk"


@dataclass(frozen=True)
class TaxonomyIndex:
    """Description embeddings of every label, computed once per enricher.

    vectors: (n_descriptions, dim) float32 unit vectors; owners: (n_descriptions,) int64 label
    index of each row.
    """

    vectors: np.ndarray
    owners: np.ndarray

    @classmethod
    def build(cls, embed: Callable[[Sequence[str]], np.ndarray]) -> TaxonomyIndex:
        texts = [text for descriptions in TAXONOMY.values() for text in descriptions]
        owners = [i for i, descriptions in enumerate(TAXONOMY.values()) for _ in descriptions]
        return cls(np.asarray(embed(texts), dtype=np.float32), np.asarray(owners, np.int64))

    def label_scores(self, notes: np.ndarray) -> np.ndarray:
        """notes: (n, dim) unit vectors -> (n, len(LABELS)): each label's best cosine."""
        sims = notes @ self.vectors.T
        scores = np.full((len(notes), len(LABELS)), -1.0, dtype=np.float32)
        np.maximum.at(scores.T, self.owners, sims.T)
        return scores

    def assign(
        self, scores: np.ndarray, max_tags: int, threshold: float, margin: float
    ) -> tuple[str, ...]:
        """One note's label scores (len(LABELS),) -> 1..max_tags labels, best first.

        The best label is always kept, so every note has a tag; each further one needs both
        `threshold` and to be within `margin` of the best, since a note is usually about one
        thing and the runners-up of a clear winner are mostly noise.
        """
        order = np.argsort(-scores, kind="stable")[:max_tags]
        floor = max(threshold, float(scores[order[0]]) - margin)
        keep = [int(order[0])] + [int(i) for i in order[1:] if scores[i] >= floor]
        return tuple(LABELS[i] for i in keep)
