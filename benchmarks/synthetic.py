"""Synthetic but varied memories and questions for load benchmarks (seeded, reproducible).

Sentences combine people, activities, objects, places, times and feelings, so embeddings spread
over the space the way personal memories do, rather than collapsing onto a few templates.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

PEOPLE = """
    Alice Bob Carmen Deepak Elena Farid Grace Hiro Ines Jamal Kira Liam Mona Nadia Omar
    Priya Quinn Rosa Sven Tara Umar Vera Wen Xavier Yara Zane Aiko Bruno Chloe Dmitri Esme
    Felix Gita Hugo Ivy Jonas Kemal Lucia Mateo Noor Olga Pavel Rania Sami Tomas Uma Viktor
    Willa Yusuf Zora
""".split()
ACTIVITIES = """
    hiked baked painted repaired adopted visited planted sold bought learned taught wrote
    recorded cycled photographed cooked designed sewed carved knitted coached studied
    translated restored organised sketched climbed fished sailed brewed composed edited
    rehearsed volunteered
""".split()
OBJECTS = [
    item.strip()
    for item in """
    a sourdough loaf  |  a watercolour of the harbour  |  the old bicycle  |  a rescue
    greyhound  |  a vegetable garden  |  a vintage camera  |  a pottery bowl  |  a birthday
    cake  |  a wooden bookshelf  |  a marathon training plan  |  a jazz standard on piano  |
    a short story about the sea  |  a quilt  |  a bird feeder  |  a kayak  |  a spreadsheet
    of expenses  |  a podcast episode  |  a mural for the school  |  a chess opening  |  a
    Spanish lesson  |  a lemon tart  |  a telescope  |  a treehouse  |  a wedding speech  |
    a climbing route  |  a mobile app  |  a family recipe book  |  a herb spiral  |  a
    sailing dinghy  |  a poetry zine  |  a ceramic vase  |  a vegetable curry  |  a robot
    kit  |  a community fridge
""".split("|")
]
PLACES = [
    item.strip()
    for item in """
    in Lisbon  |  at the lake cabin  |  in the community centre  |  at grandma's house  |
    in Kyoto  |  by the river  |  at the farmers market  |  in the garage  |  at the library
    |  in Montreal  |  on the roof  |  at the beach in Cornwall  |  in the mountains near
    Grenoble  |  at the office  |  in the city park  |  at the art studio  |  in Nairobi  |
    at the youth club  |  in the allotment  |  at a hostel in Hanoi
""".split("|")
]
FEELINGS = [
    item.strip()
    for item in """
    and felt proud  |  and it was exhausting  |  and everyone loved it  |  though it rained
    all day  |  and plans to do it again  |  after weeks of practice  |  with an old friend
    |  to raise money for charity  |  and learned a lot  |  even though it went wrong twice
    |  for the first time  |  as a surprise
""".split("|")
]
QUESTIONS = [
    "What did {p} {a} {pl}?",
    "When did {p} work on {o}?",
    "Who {a} {o}?",
    "Where did {p} go with {o}?",
    "How did {p} feel about {o}?",
    "What happened {pl} last spring?",
]


class MemoryGenerator:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.start = datetime(2022, 1, 1, tzinfo=UTC)
        self.count = 0

    def _pick(self, items: list[str]) -> str:
        return " ".join(self.rng.choice(items).split())  # folds line breaks inside an item

    def sentence(self) -> str:
        return (
            f"{self._pick(PEOPLE)} {self._pick(ACTIVITIES)} {self._pick(OBJECTS)} "
            f"{self._pick(PLACES)} {self._pick(FEELINGS)}."
        )

    def memory(self) -> dict:
        self.count += 1
        when = self.start + timedelta(minutes=37 * self.count)
        return {
            "content": self.sentence(),
            "speaker": self._pick(PEOPLE),
            "session_id": f"s{self.count // 40}",
            "timestamp": when.isoformat(),
        }

    def batch(self, n: int) -> list[dict]:
        return [self.memory() for _ in range(n)]

    def question(self) -> str:
        template = self.rng.choice(QUESTIONS)
        return template.format(
            p=self._pick(PEOPLE),
            a=self._pick(ACTIVITIES),
            o=self._pick(OBJECTS),
            pl=self._pick(PLACES),
        )
