"""The KV-cache path of the engine: prefix states, chunked prefill, eviction, greedy generation.

Every answer of the cached path is compared with a full recompute through the batched path that
serving used before (``Query`` work items: the whole history through the jagged encoder).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from benchmarks.random_export import make_random_artifact
from models.config import EncoderType, ModelConfig
from models.hstu import HSTU
from models.incremental import (
    PaddedCaches,
    append_decoded,
    decode_padded,
    extend,
    extend_candidates,
    extend_one_each,
)
from models.ops.hstu_attention import tuning_length, tuning_lengths
from models.recommender import encode_histories, score_items
from serving.artifact import load_artifact
from serving.engine import Engine, sample_softmax
from serving.kv_cache import KVCache
from serving.work import Beam, BeamStep, Decode, Prefill, Query, Score

MAX_LEN = 24
NUM_ITEMS_IN_ARTIFACT = 60
CONFIG = ModelConfig(embedding_dim=16, attention_dim=8, linear_dim=8, num_heads=2, num_blocks=2, max_seq_len=MAX_LEN)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    _, path = make_random_artifact(tmp_path_factory.mktemp("kv") / "export", num_items=60, config=CONFIG)
    art = load_artifact(path)
    # Random-init weights are near zero and make every score alike; spread them so orders are meaningful.
    g = torch.Generator().manual_seed(3)
    for name, t in art.encoder_state.items():
        if t.is_floating_point():
            art.encoder_state[name] = torch.randn(t.shape, generator=g) * 0.3
    return art


def history(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 61, n).astype(np.int64), np.cumsum(rng.integers(0, 10_000, n)).astype(np.int64)


def query(items: np.ndarray, stamps: np.ndarray, top_k: int = 10) -> Query:
    return Query(items=items[-MAX_LEN:], timestamps=stamps[-MAX_LEN:], top_k=top_k, exclude=np.unique(items),
                 candidates=None, chunk_size=10)


def prefill(engine: Engine, key: str | None, q: Query, budget: int = 1000):
    state, remaining = None, 1
    while remaining:
        (done,) = engine.compute([Prefill(key, q.items, q.timestamps, budget, state)])
        state, remaining = done.state, done.remaining
    return state


def assert_same(a, b) -> None:
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_extend_in_pieces_equals_the_encoder_on_the_whole_sequence() -> None:
    torch.manual_seed(0)
    hstu = HSTU(CONFIG).eval()
    for p in hstu.parameters():
        p.data.normal_(0, 0.3)
    table = torch.randn(61, 16)
    items, stamps = (torch.from_numpy(x) for x in history(1, MAX_LEN))
    full = hstu(table[items], stamps, torch.tensor([0, MAX_LEN]))
    state, pieces = None, []
    for a, b in [(0, 1), (1, 9), (9, 10), (10, MAX_LEN)]:  # single tokens and chunks, up to max_seq_len
        out, state = extend(hstu, table, items[a:b], stamps[a:b], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        extend(hstu, table, items[:1], stamps[:1], state)


def test_cached_answers_after_appended_events_equal_a_full_recompute(artifact) -> None:
    engine = Engine(artifact, kv_cache_bytes=1 << 20)
    items, stamps = history(2, 20)
    first = query(items[:12], stamps[:12])
    state = prefill(engine, "u", first)
    (cached,) = engine.compute([Score(state, first)])
    (full,) = engine.compute([first])
    assert_same(cached, full)
    assert engine.cache.misses == 1 and engine.cache.hits == 0

    # Three more events arrive (AppendEvents): only they are computed, the rest comes from the cache.
    later = query(items[:15], stamps[:15])
    (step,) = engine.compute([Prefill("u", later.items, later.timestamps, 1000)])
    assert step.computed == 3 and step.remaining == 0 and engine.cache.hits == 1
    (cached,) = engine.compute([Score(step.state, later)])
    (full,) = engine.compute([later])
    assert_same(cached, full)

    # A history that is not an extension of the cached one (an edited past) is a miss, recomputed.
    edited_items = later.items.copy()
    edited_items[0] = edited_items[0] % 60 + 1
    edited = query(edited_items, later.timestamps)
    (step,) = engine.compute([Prefill("u", edited.items, edited.timestamps, 1000)])
    assert step.computed == len(edited.items) and engine.cache.misses == 2
    (cached,) = engine.compute([Score(step.state, edited)])
    assert_same(cached, engine.compute([edited])[0])


def test_window_that_slides_past_max_seq_len_is_recomputed(artifact) -> None:
    engine = Engine(artifact, kv_cache_bytes=1 << 20)
    items, stamps = history(3, MAX_LEN + 5)
    before = query(items[:MAX_LEN], stamps[:MAX_LEN])
    prefill(engine, "u", before)
    after = query(items, stamps)  # the window dropped its 5 oldest events: positions moved
    (step,) = engine.compute([Prefill("u", after.items, after.timestamps, 1000)])
    assert step.computed == MAX_LEN
    assert_same(engine.compute([Score(step.state, after)])[0], engine.compute([after])[0])


def test_eviction_under_a_tiny_budget_keeps_answers_correct(artifact) -> None:
    engine = Engine(artifact, kv_cache_bytes=1 << 20)
    one_state = prefill(engine, "probe", query(*history(4, 20))).nbytes
    engine.cache = KVCache(budget_bytes=int(one_state * 1.5))  # room for about one user
    users = {f"u{i}": history(10 + i, 20) for i in range(4)}
    for _ in range(2):
        for key, (items, stamps) in users.items():
            q = query(items, stamps)
            state = prefill(engine, key, q, budget=7)
            assert_same(engine.compute([Score(state, q)])[0], engine.compute([q])[0])
    assert engine.cache.evictions >= 6 and len(engine.cache) == 1
    assert engine.cache.bytes <= engine.cache.budget_bytes


def test_chunked_long_prefill_interleaved_with_short_requests(artifact) -> None:
    engine = Engine(artifact, kv_cache_bytes=1 << 20)
    long_q = query(*history(5, MAX_LEN))
    shorts = [query(*history(20 + i, 3)) for i in range(6)]
    alone = [engine.compute([q])[0] for q in shorts]

    # Each step carries one chunk of 5 tokens of the long history beside a short request.
    state, answers, remaining, i = None, [], 1, 0
    while remaining:
        done, short_state = engine.compute([Prefill("long", long_q.items, long_q.timestamps, 5, state),
                                            Prefill(None, shorts[i].items, shorts[i].timestamps, 5)])
        assert done.computed <= 5
        state, remaining = done.state, done.remaining
        answers.append(engine.compute([Score(short_state.state, shorts[i])])[0])
        i += 1
    assert i == 5  # 24 tokens in chunks of 5: five steps, each beside one short request
    for got, want in zip(answers, alone[:5], strict=True):
        assert_same(got, want)
    assert_same(engine.compute([Score(state, long_q)])[0], engine.compute([long_q])[0])


def reference_greedy(engine: Engine, items: np.ndarray, stamps: np.ndarray, n: int, banned: set[int]) -> list[int]:
    """The model called on the growing sequence, no cache: the definition greedy Generate must match."""
    out, items, stamps = [], list(items), list(stamps)
    for _ in range(n):
        window_items = torch.tensor(items[-MAX_LEN:])
        window_stamps = torch.tensor(stamps[-MAX_LEN:])
        with torch.inference_mode():
            user = encode_histories(engine.encoder, engine.item_table, window_items, window_stamps,
                                    torch.tensor([0, len(window_items)]))
            scores = score_items(user, engine.item_vectors)[0]
            scores[sorted(banned | set(out))] = float("-inf")
        best = int(torch.argmax(scores))
        out.append(best)
        items.append(best)
        stamps.append(stamps[-1])
    return out


@pytest.mark.parametrize("length", [1, 8, MAX_LEN - 3])  # the last one slides past max_seq_len
def test_greedy_generation_equals_the_model_on_the_growing_sequence(artifact, length) -> None:
    engine = Engine(artifact, kv_cache_bytes=1 << 20)
    items, stamps = history(6 + length, length)
    exclude = {5, 6}
    want = reference_greedy(engine, items, stamps, 10, set(items.tolist()) | exclude)
    state = prefill(engine, "g", query(items, stamps))
    banned, got = np.union1d(items, list(exclude)), []
    for _ in range(10):
        (step,) = engine.compute([Decode(state, banned, 0.0, int(stamps[-1]))])
        got.append(step.item)
        banned, state = np.append(banned, step.item), step.state
    assert got == want
    # Generation never wrote its hypothetical items into the user's cached state.
    cached = engine.cache.lookup("g", items[-MAX_LEN:], stamps[-MAX_LEN:])
    assert cached is not None and cached.length == min(length, MAX_LEN)


def test_sampling_is_seeded_and_respects_bans(artifact) -> None:
    engine = Engine(artifact)
    items, stamps = history(7, 10)
    state = prefill(engine, None, query(items, stamps))
    banned = np.arange(1, 50)  # only items 50..60 remain

    def draw(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [engine.compute([Decode(state, banned, 1.0, int(stamps[-1]), g)])[0].item for _ in range(8)]

    assert draw(1) == draw(1)
    assert all(50 <= i <= 60 for i in draw(2))
    assert len(set(draw(3) + draw(4) + draw(5))) > 1


def generate(engine: Engine, state, banned: np.ndarray, stamp: int, temperature: float, seed: int,
             n: int = 10) -> list[int]:
    """``n`` Decode steps from ``state``, as the server's Generate runs them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        (step,) = engine.compute([Decode(state, banned, temperature, stamp, g)])
        out.append(step.item)
        banned, state = np.append(banned, step.item), step.state
    return out


def test_a_very_small_temperature_is_greedy(artifact) -> None:
    """Temperature is relative to the trained one (0.05): at 0.02 the logits are cosine / 1e-3, so the
    top-two gaps of this model's steps (0.028 and up) leave the runner-up at most e^-28 of the best's
    chance. (Dividing the raw cosines by 0.02 leaves it e^-1.4, and these seeds stray from greedy.)"""
    engine = Engine(artifact)
    items, stamps = history(7, 10)
    state = prefill(engine, None, query(items, stamps))
    banned, stamp = np.unique(items), int(stamps[-1])
    greedy = generate(engine, state, banned, stamp, 0.0, seed=0)
    for seed in range(8):
        assert generate(engine, state, banned, stamp, 0.02, seed) == greedy, seed


def test_temperature_one_samples_the_trained_distribution(artifact) -> None:
    """At temperature 1 the sampler draws from softmax(cosine / ModelConfig.temperature), the
    distribution the model was trained on: with the same generator, every draw is ``sample_softmax``'s
    draw from exactly those (float64) probabilities, whose exactness the next test checks."""
    engine = Engine(artifact)
    assert engine.config.temperature == 0.05
    items, stamps = history(7, 10)
    state = prefill(engine, None, query(items, stamps))
    banned = np.unique(items)
    cosine = score_items(state.user[None], engine.item_vectors)[0].double()
    cosine[banned] = float("-inf")
    trained = torch.softmax(cosine / 0.05, dim=0)
    for seed in range(20):
        (step,) = engine.compute([Decode(state, banned, 1.0, int(stamps[-1]), torch.Generator().manual_seed(seed))])
        assert step.item == sample_softmax(trained.log(), torch.Generator().manual_seed(seed)), seed


def test_sample_softmax_draws_the_softmax_distribution() -> None:
    """The exponential race against the probabilities themselves: 20,000 draws over 6 outcomes (one
    impossible), each frequency within 4.5 standard deviations of its probability."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.5, float("-inf"), 0.5])
    probs = torch.softmax(logits.double(), dim=0).numpy()
    gen, n = torch.Generator().manual_seed(0), 20_000
    counts = np.bincount([sample_softmax(logits, gen) for _ in range(n)], minlength=len(probs))
    assert counts[4] == 0
    np.testing.assert_array_less(np.abs(counts / n - probs), 4.5 * np.sqrt(probs * (1 - probs) / n) + 1e-12)


def test_sasrec_has_no_prefix_states(tmp_path) -> None:
    _, path = make_random_artifact(tmp_path / "export", config=ModelConfig(encoder=EncoderType.SASREC))
    engine = Engine(load_artifact(path), kv_cache_bytes=1 << 20)
    assert engine.cache is None
    with pytest.raises(NotImplementedError, match="HSTU"):
        engine.compute([Prefill(None, np.array([1, 2]), np.array([0, 1]), 10)])


def test_a_batch_of_decode_steps_equals_each_step_alone(artifact) -> None:
    """Generations of different lengths (one with a full window, which slides) in one model step."""
    engine = Engine(artifact)
    states = [prefill(engine, None, query(*history(30 + i, n))) for i, n in enumerate([1, 7, MAX_LEN - 1, MAX_LEN, 3])]
    decodes = [Decode(s, np.array([1, 2, 3]), 0.0, int(s.timestamps[-1]) + 5) for s in states]
    together = engine.compute(decodes)
    for d, got in zip(decodes, together, strict=True):
        scores = score_items(d.state.user[None], engine.item_vectors)[0].clone()
        scores[[1, 2, 3]] = float("-inf")
        assert got.item == int(torch.argmax(scores))
        ids, stamps = torch.tensor([got.item]), torch.tensor([d.timestamp])
        if d.state.length < MAX_LEN:
            _, want = extend(engine.encoder, engine.item_table, ids, stamps, d.state)
        else:
            _, want = extend(engine.encoder, engine.item_table, torch.cat([d.state.items[1:], ids]),
                             torch.cat([d.state.timestamps[1:], stamps]), None)
        torch.testing.assert_close(got.state.user, want.user, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.state.timestamps, want.timestamps)
        for a, b in zip(got.state.keys + got.state.values, want.keys + want.values, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_cached_state_holds_only_its_own_bytes(artifact) -> None:
    """The user embedding is stored as its own row, not as a view keeping the chunk's outputs alive."""
    engine = Engine(artifact)
    state = prefill(engine, None, query(*history(40, 20)), budget=20)
    assert state.user.untyped_storage().nbytes() == state.user.numel() * state.user.element_size()


def test_candidates_in_one_pass_equal_each_candidate_appended_alone(artifact) -> None:
    """The num_targets mask on the cached history: each candidate sees the history and itself only."""
    engine = Engine(artifact)
    items, stamps = history(50, 15)
    state = prefill(engine, None, query(items, stamps))
    candidates = torch.tensor([4, 9, 4, 33, 60])  # a repeat too
    when = torch.tensor([int(stamps[-1]) + gap for gap in (0, 1, 60, 10**5, 10**8)])
    with torch.inference_mode():
        out, states = extend_candidates(engine.encoder, engine.item_table, candidates, when, state)
        for c in range(len(candidates)):
            one, at = candidates[c : c + 1], when[c : c + 1]
            alone, alone_state = extend(engine.encoder, engine.item_table, one, at, state)
            torch.testing.assert_close(out[c], alone[0], rtol=1e-5, atol=1e-5)
            for a, b in zip(states[c].keys + states[c].values, alone_state.keys + alone_state.values, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert torch.equal(states[c].items, alone_state.items)


def beam_search(engine: Engine, state, banned: np.ndarray, steps: int, width: int, stamp: int) -> tuple[Beam, ...]:
    beams = (Beam(state),)
    for _ in range(steps):
        (beams,) = engine.compute([BeamStep(beams, banned, width, stamp)])
    return beams


def test_beam_of_width_one_is_greedy(artifact) -> None:
    engine = Engine(artifact)
    items, stamps = history(51, 9)
    state = prefill(engine, None, query(items, stamps))
    banned = np.unique(items)
    (beam,) = beam_search(engine, state, banned, 8, 1, int(stamps[-1]))
    greedy = reference_greedy(engine, items, stamps, 8, set(banned.tolist()))
    assert list(beam.items) == greedy


def test_a_beam_as_wide_as_the_catalogue_finds_the_best_two_item_sequence(artifact) -> None:
    engine = Engine(artifact)
    items, stamps = history(52, 6)
    state = prefill(engine, None, query(items, stamps))
    banned, stamp, tau = np.unique(items), int(stamps[-1]), engine.config.temperature

    def log_probs(user: torch.Tensor, exclude: list[int]) -> torch.Tensor:
        scores = score_items(user[None], engine.item_vectors)[0].clone()
        scores[sorted(set(banned.tolist()) | set(exclude))] = float("-inf")
        return torch.log_softmax(scores.double() / tau, dim=0)

    with torch.inference_mode():  # exhaustive: every first item, then its best second item
        first = log_probs(state.user, [])
        best, best_pair = -float("inf"), None
        for a in torch.nonzero(torch.isfinite(first)).flatten().tolist():
            _, after = extend(engine.encoder, engine.item_table, torch.tensor([a]), torch.tensor([stamp]), state)
            second = log_probs(after.user, [a])
            b = int(torch.argmax(second))
            if float(first[a] + second[b]) > best:
                best, best_pair = float(first[a] + second[b]), (a, b)
    beams = beam_search(engine, state, banned, 2, NUM_ITEMS_IN_ARTIFACT, stamp)
    assert beams[0].items == best_pair
    assert beams[0].log_prob == pytest.approx(best, rel=1e-6)
    assert [b.log_prob for b in beams] == sorted((b.log_prob for b in beams), reverse=True)


def reference_beam_search(engine: Engine, items, stamps, banned: np.ndarray, steps: int, width: int):
    """Beam search with every beam's user embedding recomputed from its whole sequence, no cache."""
    beams, tau = [((), 0.0)], engine.config.temperature
    for _ in range(steps):
        candidates = []
        for seq, log_prob in beams:
            grown = (list(items) + list(seq))[-MAX_LEN:]
            grown_stamps = (list(stamps) + [stamps[-1]] * len(seq))[-MAX_LEN:]
            with torch.inference_mode():
                user = encode_histories(engine.encoder, engine.item_table, torch.tensor(grown),
                                        torch.tensor(grown_stamps), torch.tensor([0, len(grown)]))
                scores = score_items(user, engine.item_vectors)[0]
                scores[sorted(set(banned.tolist()) | set(seq))] = float("-inf")
                step = torch.log_softmax(scores.double() / tau, dim=0)
            finite = torch.nonzero(torch.isfinite(step)).flatten().tolist()
            candidates += [(seq + (c,), log_prob + float(step[c])) for c in finite]
        beams = sorted(candidates, key=lambda b: -b[1])[:width]
    return beams


@pytest.mark.parametrize(("length", "width", "steps"), [(5, 3, 4), (MAX_LEN - 1, 3, 4), (MAX_LEN, 4, 3)])
def test_beam_search_equals_a_full_recompute_reference(artifact, length, width, steps) -> None:
    """Beams that cross into, or start in, a full window (which slides and is recomputed) included."""
    engine = Engine(artifact)
    items, stamps = history(70 + length, length)
    banned = np.unique(items)
    beams = beam_search(engine, prefill(engine, None, query(items, stamps)), banned, steps, width, int(stamps[-1]))
    want = reference_beam_search(engine, items, stamps, banned, steps, width)
    assert [b.items for b in beams] == [w[0] for w in want]
    # float32 sums in another order (cached prefix, then new tokens), in logits that are cosines / 0.05
    np.testing.assert_allclose([b.log_prob for b in beams], [w[1] for w in want], rtol=1e-5)


def test_a_beam_wider_than_the_items_left_keeps_only_real_sequences(artifact) -> None:
    engine = Engine(artifact)
    items, stamps = history(80, 5)
    allowed = [i for i in range(1, NUM_ITEMS_IN_ARTIFACT + 1) if i not in set(items.tolist())][:3]
    banned = np.array(sorted(set(range(1, NUM_ITEMS_IN_ARTIFACT + 1)) - set(allowed)))
    beams = beam_search(engine, prefill(engine, None, query(items, stamps)), banned, 2, 8, int(stamps[-1]))
    assert len(beams) == 6 and all(np.isfinite(b.log_prob) for b in beams)  # 3 x 2 ordered pairs
    assert {b.items for b in beams} == set(itertools.permutations(allowed, 2))


def test_decode_in_a_bigger_padded_bucket_equals_the_exact_batch(artifact) -> None:
    """What a CUDA graph bucket does: more rows and a longer cache than needed, the rest padding."""
    engine = Engine(artifact)
    states = [prefill(engine, None, query(*history(90 + i, n))) for i, n in enumerate([1, 9, MAX_LEN - 1])]
    items = torch.tensor([4, 5, 6])
    stamps = torch.stack([s.timestamps[-1] + 30 for s in states])
    with torch.inference_mode():
        want, want_states = extend_one_each(engine.encoder, engine.item_table, items, stamps, states)
        caches = PaddedCaches.allocate(engine.encoder, 8, MAX_LEN + 8, "cpu")
        for t in caches.keys + caches.values:
            t.normal_()  # stale rows from an earlier step must not leak in
        caches.fill(states)
        padded_items = torch.cat([items, torch.zeros(5, dtype=torch.int64)])
        padded_stamps = torch.cat([stamps, torch.zeros(5, dtype=torch.int64)])
        out, keys, values = decode_padded(engine.encoder, engine.item_table, padded_items, padded_stamps, caches)
        got_states = append_decoded(states, items, stamps, out[:3], [k[:3] for k in keys], [v[:3] for v in values])
    torch.testing.assert_close(out[:3], want, rtol=1e-5, atol=1e-5)
    for got, exp in zip(got_states, want_states, strict=True):
        for a, b in zip(got.keys + got.values, exp.keys + exp.values, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_decode_steps_equal_eager_ones(artifact) -> None:
    eager, graphed = Engine(artifact, "cuda"), Engine(artifact, "cuda", cuda_graphs=True)
    assert graphed.graphs.capture(max_batch=4) > 0
    start = [prefill(eager, None, query(*history(100 + i, n))) for i, n in enumerate([1, 5, 17, MAX_LEN - 4])]
    banned = np.array([1, 2])
    want_states, got_states = start, start
    for _ in range(3):  # each engine carries its own states forward
        want = eager.compute([Decode(s, banned, 0.0, int(s.timestamps[-1])) for s in want_states])
        got = graphed.compute([Decode(s, banned, 0.0, int(s.timestamps[-1])) for s in got_states])
        for w, g in zip(want, got, strict=True):
            assert w.item == g.item
            for a, b in zip(g.state.keys + g.state.values + (g.state.user,),
                            w.state.keys + w.state.values + (w.state.user,), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        want_states, got_states = [w.state for w in want], [g.state for g in got]
    assert graphed.graphs.replays == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graph_one_event_prefills_equal_eager_ones(artifact) -> None:
    """A cached user's one new event goes through the decode graph; the answers and states match eager."""
    eager = Engine(artifact, "cuda", kv_cache_bytes=1 << 26)
    graphed = Engine(artifact, "cuda", kv_cache_bytes=1 << 26, cuda_graphs=True)
    users = [(f"u{i}", *history(200 + i, n)) for i, n in enumerate([2, 9, 17, MAX_LEN - 1])]
    for engine in (eager, graphed):
        for key, items, stamps in users:
            prefill(engine, key, query(items[:-1], stamps[:-1]))
    work = [Prefill(key, items, stamps, 64) for key, items, stamps in users]
    want, got = eager.compute(work), graphed.compute(work)
    assert graphed.graphs.replays == 1  # all four in one replay
    for w, g, (_, items, stamps) in zip(want, got, users, strict=True):
        assert w.computed == g.computed == 1 and g.remaining == 0
        for a, b in zip(g.state.keys + g.state.values + (g.state.user,),
                        w.state.keys + w.state.values + (w.state.user,), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        q = query(items, stamps)
        (rw,), (rg,) = eager.compute([Score(w.state, q)]), graphed.compute([Score(g.state, q)])
        np.testing.assert_array_equal(rw.items, rg.items)


def test_warm_up_runs_a_batch_at_every_tuning_length(artifact) -> None:
    """The kernels are tuned per bucket of a batch's longest sequence; warm-up must meet each one, so
    that no request pays for a tuning run (on a GPU a stall of about a second)."""
    engine = Engine(artifact)
    longest: set[int] = set()
    compute = engine.compute

    def recording(work):
        queries = [w for w in work if isinstance(w, Query)]
        if queries:
            longest.add(tuning_length(max(len(q.items) for q in queries)))
        return compute(work)

    engine.compute = recording
    engine.warm_up(max_batch_size=4)
    assert longest == set(tuning_lengths(MAX_LEN)) == {16, 32}


def _compiled_kernels() -> int:
    """Kernels Triton has compiled (every variant and tuning trial) for the attention ops so far."""
    from models.ops import hstu_attention_cached_triton as cached_op
    from models.ops import hstu_attention_triton as op

    kernels = (op._hstu_fwd_kernel, op._hstu_bwd_dq_kernel, op._hstu_bwd_dkdv_kernel, cached_op._cached_fwd_kernel)
    return sum(len(entry[0]) for k in kernels for entry in k.device_caches.values())


def _forget_compiled_kernels() -> None:
    from models.ops import hstu_attention_cached_triton as cached_op
    from models.ops import hstu_attention_triton as op

    for k in (op._hstu_fwd_kernel, op._hstu_bwd_dq_kernel, op._hstu_bwd_dkdv_kernel, cached_op._cached_fwd_kernel):
        k.device_caches.clear()
    for which in ("fwd", "dq", "dkdv"):
        op._tuned(which).cache.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles for CUDA")
def test_after_warm_up_no_request_compiles_or_tunes_a_kernel(artifact) -> None:
    """Batches of any size and length after warm-up (Recommend, chunked prefills, one-event
    extensions, decode steps) reuse the kernels compiled then: none is compiled or tuned while serving."""
    _forget_compiled_kernels()
    engine = Engine(artifact, "cuda", kv_cache_bytes=1 << 26)
    engine.warm_up(max_batch_size=8)
    compiled = _compiled_kernels()
    assert compiled > 0
    rng = np.random.default_rng(0)
    for step in range(40):
        lengths = rng.integers(1, MAX_LEN + 1, int(rng.integers(1, 9)))
        histories = [history(1000 * step + i, int(n)) for i, n in enumerate(lengths)]
        engine.compute([query(items, stamps) for items, stamps in histories])
        states = engine.compute([Prefill(f"u{step % 5}-{i}", items, stamps, budget=int(rng.integers(1, 9)))
                                 for i, (items, stamps) in enumerate(histories)])
        engine.compute([Decode(s.state, np.array([1]), 0.0, int(s.state.timestamps[-1])) for s in states
                        if s.state.length < MAX_LEN])
    assert _compiled_kernels() == compiled
