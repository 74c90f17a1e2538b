import numpy as np
import pytest

from dedup.core.config import Config
from dedup.engine.cluster import cluster
from dedup.search.pairs import connected_components, hamming_pairs, unique_codes
from dedup.signals.edges import Candidates
from dedup.signals.phash import hamming


def random_codes(n, seed, near=0.3):
    """Random 64-bit codes, a share of them made by flipping a few bits of another."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    for i in range(1, n):
        if rng.random() < near:
            bits = np.unpackbits(codes[rng.integers(0, i)])
            flip = rng.choice(64, size=int(rng.integers(0, 12)), replace=False)
            bits[flip] ^= 1
            codes[i] = np.packbits(bits)
    return codes


def brute_pairs(codes, threshold):
    d = hamming(codes[:, None, :], codes[None, :, :])
    i, j = np.nonzero(np.triu(d <= threshold, k=1))
    return i, j, d[i, j]


@pytest.mark.parametrize("threshold", [0, 1, 4, 8, 12])
@pytest.mark.parametrize("seed", [0, 1])
def test_faiss_pairs_equal_brute_force(threshold, seed):
    codes = unique_codes(random_codes(600, seed))[0]
    i, j, d = hamming_pairs(codes, threshold)
    bi, bj, bd = brute_pairs(codes, threshold)
    assert i.tolist() == bi.tolist()
    assert j.tolist() == bj.tolist()
    assert d.tolist() == bd.tolist()


def test_pairs_across_query_batches(monkeypatch):
    import dedup.search.pairs

    monkeypatch.setattr(dedup.search.pairs, "QUERY_BATCH", 37)
    codes = unique_codes(random_codes(300, 5))[0]
    got = hamming_pairs(codes, 10)
    want = brute_pairs(codes, 10)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def brute_components(codes, threshold):
    """Union-find over every pair within the threshold, by brute force."""
    n = len(codes)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    d = hamming(codes[:, None, :], codes[None, :, :])
    for a in range(n):
        for b in range(a + 1, n):
            if d[a, b] <= threshold:
                parent[find(b)] = find(a)
    roots = [find(x) for x in range(n)]
    first = {}
    for x, r in enumerate(roots):
        first.setdefault(r, x)
    return np.array([first[r] for r in roots])


@pytest.mark.parametrize("threshold", [0, 6, 10])
def test_clusters_equal_brute_force_union_find(threshold):
    codes = random_codes(400, 11, near=0.5)
    codes[50] = codes[10]  # repeated codes take the collapsed path
    codes[51] = codes[10]
    n = len(codes)
    cand = Candidates(
        pixels=np.ones(n, dtype=np.int64),
        nbytes=np.ones(n, dtype=np.int64),
        digest=np.arange(n, dtype=np.int64).view(np.uint8).reshape(n, 8).repeat(4, axis=1),
        phash=codes,
    )
    result = cluster(
        cand,
        Config(
            signals=("phash",), phash_threshold=threshold, keep="first", cluster_rule="components"
        ),
    )
    want = brute_components(codes, threshold)
    assert result.cluster_id.tolist() == want.tolist()
    assert result.survivor.tolist() == want.tolist()  # keep=first: the first row survives
    sizes = np.bincount(want, minlength=n)[want]
    assert result.cluster_size.tolist() == sizes.tolist()
    g = result.groups
    assert g.cluster_id.tolist() == sorted(set(want[sizes > 1].tolist()))
    for k, cid in enumerate(g.cluster_id.tolist()):
        members = codes[want == cid]
        assert g.size[k] == len(members)
        assert g.max_phash_distance[k] == int(hamming(members[:, None], members[None]).max())
        assert g.max_phash_distance_to_survivor[k] == int(hamming(members, codes[cid]).max())
        assert g.signal_names(k) == ["phash"]


def test_survivor_rule_largest_then_bytes_then_order():
    codes = np.zeros((5, 8), dtype=np.uint8)  # one cluster
    cand = Candidates(
        pixels=np.array([100, 400, 400, 400, 50], dtype=np.int64),
        nbytes=np.array([999, 10, 30, 30, 5000], dtype=np.int64),
        digest=np.repeat(np.array([[1], [2], [3], [3], [5]], dtype=np.uint8), 32, axis=1),
        phash=codes,
    )
    result = cluster(cand, Config(keep="largest"))
    assert result.survivor.tolist() == [2] * 5
    from dedup.signals.edges import DECISIONS

    assert [DECISIONS[r] for r in result.reason] == ["phash", "phash", "survivor", "exact", "phash"]
    first = cluster(cand, Config(keep="first"))
    assert first.survivor.tolist() == [0] * 5


def test_connected_components_on_long_chains_and_stars():

    n = 2000
    rng = np.random.default_rng(4)
    perm = rng.permutation(n)
    # A path visiting rows in random order, plus a star and isolated rows.
    i = np.concatenate([perm[:999], np.full(300, 1500)])
    j = np.concatenate([perm[1:1000], np.arange(1200, 1500)])
    keep = (i < 1200) == (j < 1200)  # the star lives in rows >= 1200
    labels = connected_components(n, i[keep], j[keep])
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(i[keep].tolist(), j[keep].tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    assert labels.tolist() == [find(x) for x in range(n)]


@pytest.mark.parametrize("threshold", [0, 3, 8, 12])
def test_multi_index_hashing_equals_brute_force(threshold):
    codes = unique_codes(random_codes(900, 21 + threshold, near=0.5))[0]
    got = hamming_pairs(codes, threshold, engine="mih")
    want = brute_pairs(codes, threshold)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert len(got[0]) > 0 or threshold == 0


def test_engine_choice():
    from dedup.search.pairs import choose_engine

    assert choose_engine(1000, 8)[0] == "flat"
    assert choose_engine(1_000_000, 8) == ("mih", 3)


def test_exact_groups_link_each_repeat_to_its_first_row():
    from dedup.signals.exact import exact_groups

    rng = np.random.default_rng(9)
    pool = rng.integers(0, 256, (30, 32), dtype=np.uint8)
    digests = pool[rng.integers(0, 30, 200)]
    first, rows = exact_groups(digests)
    seen = {}
    want = []
    for r, d in enumerate(digests):
        key = d.tobytes()
        if key in seen:
            want.append((seen[key], r))
        else:
            seen[key] = r
    got = sorted(zip(first.tolist(), rows.tolist(), strict=True), key=lambda p: p[1])
    assert got == want


def _chain_codes():
    """A, B, C with d(A, B) = 5, d(B, C) = 5, d(A, C) = 10, and D far from all."""
    bits = np.zeros((4, 64), dtype=np.uint8)
    bits[1, :5] = 1
    bits[2, :10] = 1
    bits[3, 20:50] = 1
    return np.packbits(bits, axis=1)


def _chain_candidates(codes):
    n = len(codes)
    return Candidates(
        pixels=np.ones(n, dtype=np.int64),
        nbytes=np.ones(n, dtype=np.int64),
        digest=np.arange(n, dtype=np.int64).view(np.uint8).reshape(n, 8).repeat(4, axis=1),
        phash=codes,
    )


def test_star_rule_cuts_chains():
    from dedup.signals.edges import DECISIONS

    cand = _chain_candidates(_chain_codes())
    comp = cluster(
        cand, Config(signals=("phash",), phash_threshold=6, keep="first", cluster_rule="components")
    )
    assert comp.survivor.tolist() == [0, 0, 0, 3]
    star = cluster(cand, Config(signals=("phash",), phash_threshold=6, keep="first"))
    assert star.survivor.tolist() == [0, 0, 2, 3]  # C is 10 bits from A: it stays
    assert star.cluster_id.tolist() == [0, 0, 2, 3]
    assert [DECISIONS[r] for r in star.reason] == ["survivor", "phash", "unique", "unique"]
    assert star.phash_distance.tolist()[1] == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_star_rule_keeps_every_removed_row_within_the_threshold(seed):
    codes = random_codes(500, 30 + seed, near=0.6)
    n = len(codes)
    cand = _chain_candidates(codes)
    result = cluster(cand, Config(signals=("phash",), phash_threshold=8, keep="first"))
    removed = result.survivor != np.arange(n)
    d = hamming(codes[removed], codes[result.survivor[removed]])
    assert (d <= 8).all()
    assert (result.survivor[result.survivor] == result.survivor).all()  # survivors stay
    comp = brute_components(codes, 8)
    assert (comp[result.survivor] == comp).all()  # star clusters split components only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_star_rule_equals_brute_force_greedy(seed):
    """The star rule against its definition on every pair: best rows first, each row
    not yet claimed is kept and claims every unclaimed row linked to it directly (same
    image bytes, or pHash codes within the threshold)."""
    rng = np.random.default_rng(seed)
    n = 400
    codes = random_codes(n, seed, near=0.6)
    words = codes.view(">u8").reshape(-1)
    digest = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    copies = rng.random(n) < 0.2
    digest[copies] = digest[rng.integers(0, n, n)[copies]]
    pixels = rng.integers(1, 4, n) * 100
    nbytes = rng.integers(0, 3, n)
    cand = Candidates(pixels=pixels, nbytes=nbytes, digest=digest, phash=codes)
    config = Config(signals=("exact", "phash"), phash_threshold=10, keep=("largest",))
    got = cluster(cand, config)
    linked = np.bitwise_count(words[:, None] ^ words[None, :]) <= 10
    linked |= (digest[:, None, :] == digest[None, :, :]).all(axis=2)
    want = np.full(n, -1)
    for b in np.lexsort((np.arange(n), -nbytes, -pixels)).tolist():
        if want[b] < 0:
            want[b] = b
            claim = linked[b] & (want < 0)
            want[claim] = b
    assert np.array_equal(got.survivor, want)
    assert (got.survivor != np.arange(n)).sum() > n // 4  # real clusters
