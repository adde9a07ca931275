"""The `local` enricher: A-MEM note attributes without an LLM, in two embedding calls a batch.

Keywords are KeyBERT-style (Grootendorst, 2020, https://github.com/MaartenGr/KeyBERT): candidate
1-3-grams of the note, plus capitalised word runs as cheap named entities, ranked by the cosine
between each candidate's embedding and the note's, with Maximal Marginal Relevance (Carbonell &
Goldstein, SIGIR 1998) so the chosen phrases do not repeat each other. Embedding is the cost that
matters, so the whole batch's distinct candidates go through one `embed` call and the notes
through one more; candidates per note are capped. Tags come from the fixed taxonomy
(`taxonomy.py`), dates from rules (`dates.py`), and the context sentence is built from both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from memcube.enrichment import EmbedFn, Enrichment, NoteInput
from memcube.enrichment.dates import human_date, reference_date, resolve_dates
from memcube.enrichment.taxonomy import FALLBACK_LABEL, TaxonomyIndex
from memcube.lexical import STOPWORDS, normalize_token


class LocalEnricherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_keywords: int = Field(default=3, ge=0, le=20, description="when candidates allow")
    max_keywords: int = Field(default=8, ge=1, le=20)
    max_ngram: int = Field(default=3, ge=1, le=5, description="longest n-gram candidate")
    max_candidates: int = Field(default=30, ge=1, le=200, description="per note: bounds cost")
    diversity: float = Field(default=0.5, ge=0.0, le=1.0, description="MMR: 0 relevance only")
    entity_boost: float = Field(default=0.1, ge=0.0, le=1.0, description="added to entities")
    max_tags: int = Field(default=3, ge=1, le=5)
    tag_threshold: float = Field(default=0.3, ge=-1.0, le=1.0, description="for tags past the 1st")
    tag_margin: float = Field(default=0.08, ge=0.0, le=2.0, description="below the best tag")
    max_chars: int = Field(default=2000, ge=100, le=1_000_000, description="read for keywords")

    @model_validator(mode="after")
    def _keyword_range(self) -> LocalEnricherConfig:
        if self.min_keywords > self.max_keywords:
            raise ValueError(f"min_keywords {self.min_keywords} > max_keywords {self.max_keywords}")
        return self


# Words that make poor keyphrase ends in conversation, beyond lexical.STOPWORDS: fillers,
# light verbs, evaluatives and time words (time expressions become `dates` instead).
FILLERS = frozenset(
    """
    hey hi hello yeah yes yep yup nope ok okay oh ah aw wow lol haha thanks thank please sure
    really also just like well lot lots much many even still actually definitely totally pretty
    kind sort bit maybe gonna wanna gotta us im ive dont thing things something anything
    everything nothing someone anyone everyone way ways one ones every another anyway always
    never sometimes often ever since though although yet already around back away together
    almost enough quite rather else whole cool great awesome amazing nice good glad super
    get gets got getting go goes going went gone make makes made making know knew think thought
    say said tell told let see saw seen come came take took want wanted need needs keep kept
    feel felt sounds sound seem seems look looks looking mean means try tried give gave
    day days week weeks weekend month months year years time times yesterday today tonight
    tomorrow ago last next recently lately soon morning night evening afternoon
    monday tuesday wednesday thursday friday saturday sunday january february march april may
    june july august september october november december
    two three four five six seven eight nine ten first second kinda congrats share shares
    shared photo photos pic pics picture pictures love loves loved enjoy enjoyed start started
    trying must wish talk talks talked talking chat chatted chatting
    """.split()
)
_SENTENCES = re.compile(r"[.!?…\n\[\]():;\"“”]+")
_CLAUSES = re.compile(r"[,—–]|\s-\s")
_WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")
_POSSESSIVE = re.compile(r"['’]s$", re.IGNORECASE)
_IRISH_NAME = re.compile(r"[OD]['’][A-Z]")  # O'Brien, D'Angelo: not contractions
_ENTITY_CONNECTORS = frozenset({"of", "de", "the", "and"})
_INNER_WORDS = frozenset({"of"})  # the only stop words allowed inside an n-gram
_MAX_ENTITY_WORDS = 4


@dataclass(frozen=True)
class _Token:
    word: str  # lowercase, possessive stripped
    surface: str  # as written, possessive stripped
    capitalised: bool  # a name-like capital, not one forced by the sentence start
    stop: bool  # must not begin or end a phrase


def _token(surface: str, sentence_start: bool) -> _Token:
    surface = _POSSESSIVE.sub("", surface)
    word = surface.lower()
    acronym = len(surface) > 1 and surface.isupper() and surface.isalpha()
    contraction = ("'" in word or "’" in word) and not _IRISH_NAME.match(surface)
    stop = (
        word in STOPWORDS
        or word in FILLERS
        or contraction
        or word.isdigit()
        or (len(word) < 3 and not acronym)
    )
    capitalised = not stop and (acronym or (surface[:1].isupper() and not sentence_start))
    return _Token(word, surface, capitalised, stop)


def _clauses(text: str) -> list[list[_Token]]:
    """Token runs that a phrase may not cross (sentence and clause punctuation)."""
    runs = []
    for sentence in _SENTENCES.split(text):
        start = True
        for clause in _CLAUSES.split(sentence):
            words = _WORD.findall(clause)
            runs.append([_token(w, start and i == 0) for i, w in enumerate(words)])
            start = start and not words
    return [run for run in runs if run]


@dataclass
class _Candidate:
    display: str  # first surface form, for the context sentence
    first: int  # position of first occurrence
    count: int = 0
    entity: bool = False  # a capitalised run seen at least once not as an address
    named: int = 0  # times seen as a capitalised run
    addressed: int = 0  # of those, times it was the whole clause bar fillers ("Thanks, Mel!")
    keys: frozenset[str] = field(default_factory=frozenset)  # stems, for near-duplicates


def candidates(text: str, max_ngram: int, limit: int) -> dict[str, _Candidate]:
    """Lowercase phrase -> candidate: n-grams with no stop word at either end, plus capitalised
    word runs (connectors allowed inside); at most `limit`, entities first, then the more
    frequent, then the earlier."""
    found: dict[str, _Candidate] = {}
    position = 0

    def add(tokens: list[_Token], named: bool = False, vocative: bool = False) -> None:
        phrase = " ".join(t.word for t in tokens)
        cand = found.get(phrase)
        if cand is None:
            keys = frozenset(normalize_token(t.word) for t in tokens if not t.stop)
            display = " ".join(t.surface if t.capitalised else t.word for t in tokens)
            cand = found[phrase] = _Candidate(display, position, keys=keys)
        cand.count += 1
        cand.named += named
        cand.addressed += vocative
        cand.entity = cand.entity or (named and not vocative)

    for run in _clauses(text):
        for i, first in enumerate(run):
            position += 1
            if first.stop:
                continue
            for n in range(1, min(max_ngram, len(run) - i) + 1):
                last = run[i + n - 1]
                if last.stop and last.word not in _INNER_WORDS:
                    break  # "raised my credit" and "caroline is researching" read badly
                if not last.stop:
                    add(run[i : i + n])
            if first.capitalised and (i == 0 or not run[i - 1].capitalised):
                end = i + 1
                while (
                    end < len(run)
                    and end - i < _MAX_ENTITY_WORDS
                    and (run[end].capitalised or run[end].word in _ENTITY_CONNECTORS)
                ):
                    end += 1
                while not run[end - 1].capitalised:  # no trailing connector
                    end -= 1
                # A name that is its whole clause bar fillers is someone addressed ("Thanks,
                # Mel!"), not a topic: it stays a candidate but ranks lower (`_boost`).
                vocative = all(t.stop for t in run[:i] + run[end:])
                add(run[i:end], named=True, vocative=vocative)
    ranked = sorted(found.items(), key=lambda kv: (not kv[1].entity, -kv[1].count, kv[1].first))
    return dict(ranked[:limit])


def _boost(cand: _Candidate, boost: float) -> float:
    if cand.entity:
        return boost
    return -boost if cand.named else 0.0


def mmr(relevance: np.ndarray, similarity: np.ndarray, k: int, diversity: float) -> list[int]:
    """Maximal Marginal Relevance: pick k of n items, each maximising
    (1 - diversity) * relevance - diversity * (max similarity to those already picked).

    relevance: (n,) float32; similarity: (n, n) float32. Returns indices in pick order.
    """
    picked = [int(np.argmax(relevance))]
    closest = similarity[picked[0]].copy()
    for _ in range(min(k, len(relevance)) - 1):
        score = (1.0 - diversity) * relevance - diversity * closest
        score[picked] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        np.maximum(closest, similarity[best], out=closest)
    return picked


def _is_near_duplicate(keys: frozenset[str], chosen: list[frozenset[str]]) -> bool:
    """A phrase that contains, or is contained in, a chosen one's stems adds nothing."""
    return any(keys <= other or other <= keys for other in chosen)


def _context(note: NoteInput, topics: Sequence[str], dates: Sequence[str]) -> str:
    speaker = " ".join((note.speaker or "").split()) or "Someone"
    session = " ".join((note.session_id or "").split())
    where = f"in {session} " if session else ""
    when = human_date(reference_date(note.timestamp))
    about = f"talks about {' and '.join(topics)}" if topics else "makes a brief remark"
    mentions = ""
    if dates:
        listed = ", ".join(dates[:3]) + (", ..." if len(dates) > 3 else "")
        mentions = f" (mentions {listed})"
    return f"{speaker}, {where}on {when}, {about}{mentions}."


class LocalEnricher:
    """No LLM: embedding-ranked keyphrases, taxonomy tags, rule-resolved dates."""

    name = "local"

    def __init__(self, embed: EmbedFn, config: LocalEnricherConfig | None = None) -> None:
        self.config = config or LocalEnricherConfig()
        self._embed = embed
        self._taxonomy = TaxonomyIndex.build(embed)  # once per enricher: ~50 short texts

    def enrich(self, notes: Sequence[NoteInput]) -> list[Enrichment]:
        cfg = self.config
        texts = [" ".join(note.content[: cfg.max_chars].split()) for note in notes]
        per_note = [candidates(t, cfg.max_ngram, cfg.max_candidates) for t in texts]
        phrases = sorted({p for cands in per_note for p in cands})
        row = {p: i for i, p in enumerate(phrases)}
        filled = [i for i, t in enumerate(texts) if t]
        slot = {i: j for j, i in enumerate(filled)}  # note index -> row of note_vecs
        phrase_vecs = self._embed(phrases) if phrases else None
        note_vecs = self._embed([texts[i] for i in filled]) if filled else None
        label_scores = self._taxonomy.label_scores(note_vecs) if note_vecs is not None else None

        out = []
        for i, note in enumerate(notes):
            dates = resolve_dates(note.content, note.timestamp)
            if note_vecs is None or label_scores is None or i not in slot:
                keywords: list[_Candidate] = []
                tags: tuple[str, ...] = (FALLBACK_LABEL,)
            else:
                j = slot[i]
                keywords = self._keywords(per_note[i], row, phrase_vecs, note_vecs[j])
                tags = self._taxonomy.assign(
                    label_scores[j], cfg.max_tags, cfg.tag_threshold, cfg.tag_margin
                )
            human = [human_date(d) for d in dates]
            topics = [c.display for c in keywords if not c.named or c.addressed < c.named][:2]
            out.append(
                Enrichment(
                    keywords=tuple(c.display.lower() for c in keywords),
                    tags=tags,
                    context=_context(note, topics, human),
                    dates=dates,
                )
            )
        return out

    def _keywords(
        self,
        cands: dict[str, _Candidate],
        row: dict[str, int],
        phrase_vecs: np.ndarray | None,
        note_vec: np.ndarray,
    ) -> list[_Candidate]:
        """Up to max_keywords of `cands`, most relevant first, near-duplicates dropped.

        phrase_vecs: (n_phrases, dim) float32, rows indexed by `row`; note_vec: (dim,) float32.
        """
        if not cands or phrase_vecs is None:
            return []
        cfg = self.config
        items = list(cands.values())
        vecs = phrase_vecs[[row[p] for p in cands]]
        # Entities gain the boost; names only ever addressed ("Thanks, Mel!") lose it, since
        # the addressee is rarely what a turn is about.
        boost = np.array([_boost(c, cfg.entity_boost) for c in items], np.float32)
        relevance = vecs @ note_vec + boost
        want = min(cfg.max_keywords, max(cfg.min_keywords, math.ceil(len(items) / 4)))
        # Pick extra so that dropping near-duplicates still leaves `want` phrases.
        order = mmr(relevance, vecs @ vecs.T, min(len(items), 3 * want), cfg.diversity)
        chosen: list[int] = []
        for i in order:
            if not _is_near_duplicate(items[i].keys, [items[c].keys for c in chosen]):
                chosen.append(i)
            if len(chosen) == want:
                break
        chosen.sort(key=lambda i: -relevance[i])
        return [items[i] for i in chosen]
