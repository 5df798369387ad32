#!/usr/bin/python3
"""A llama2.c model decoded greedily in NumPy, its attention through kmv.

The forward pass is llama2.c's (run.c), in float32: embeddings, RMSNorm,
rotary embeddings, grouped-query attention, a SwiGLU feed-forward network
and the classifier. Each layer's each kv head keeps one kmv attention
stream: every position appends its rotated key and its value, and every
query head sharing that kv head decodes against it, so attention is
softmax(q k^T / sqrt(head_size)) v over every position so far.

    examples/numpy_decode.py [--steps N] [--prompt TEXT] [--approx]
                             [--compare KMV_BINARY]

--compare runs `KMV_BINARY decode --exact` on the same tokens and checks
that it generates the same text (exit status 1 where it does not). With
--approx the streams answer approximately where certified: the text is
then compared, not required to agree.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import time

import numpy as np

import kmv

BOS = 1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_file(name):
    """A shipped file: in $KMV_DATA_DIR when set and there, as kmv looks,
    else in this repository's data/."""
    env = os.environ.get("KMV_DATA_DIR")
    if env and os.access(os.path.join(env, name), os.R_OK):
        return os.path.join(env, name)
    return os.path.join(ROOT, "data", name)


class Model:
    """A llama2.c checkpoint: a 7-int header, then the weights in order."""

    def __init__(self, path):
        header = np.fromfile(path, dtype=np.int32, count=7)
        if header.size != 7:
            raise ValueError(f"{path}: shorter than a llama2.c header")
        (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, vocab,
         self.seq_len) = (int(h) for h in header)
        # A negative vocabulary size says the classifier has its own weights.
        shared, self.vocab_size = vocab > 0, abs(vocab)
        self.head_size = self.dim // self.n_heads
        w = np.fromfile(path, dtype=np.float32, offset=7 * 4)
        dim, hid, L, kv = self.dim, self.hidden_dim, self.n_layers, self.head_size * self.n_kv_heads
        at = 0

        def take(*shape):
            nonlocal at
            n = int(np.prod(shape))
            a = w[at:at + n].reshape(shape)
            at += n
            return a

        self.emb = take(self.vocab_size, dim)
        self.rms_att = take(L, dim)
        self.wq, self.wk, self.wv = take(L, dim, dim), take(L, kv, dim), take(L, kv, dim)
        self.wo = take(L, dim, dim)
        self.rms_ffn = take(L, dim)
        self.w1, self.w2, self.w3 = take(L, hid, dim), take(L, dim, hid), take(L, hid, dim)
        self.rms_final = take(dim)
        take(self.seq_len, self.head_size)  # legacy rotary tables: computed instead
        self.wcls = self.emb if shared else take(self.vocab_size, dim)
        if at != w.size:
            raise ValueError(f"{path}: {w.size} weights, but its header describes {at}")

    def streams(self, exact):
        """One attention stream per (layer, kv head), as llama/llama.c keeps."""
        hs = self.head_size
        return [[kmv.Stream(hs, attention=True, cols=hs, exact=exact)
                 for _ in range(self.n_kv_heads)] for _ in range(self.n_layers)]

    def rope(self, vec, pos):
        """Rotate the pairs (2i, 2i + 1) of each head by pos times the pair's
        frequency, in float32 as llama2.c does."""
        hs = self.head_size
        freq = np.float32(1) / np.power(np.float32(10000),
                                        np.arange(0, hs, 2, dtype=np.float32) / np.float32(hs))
        angle = np.float32(pos) * freq
        cos, sin = np.cos(angle), np.sin(angle)
        pairs = vec.reshape(-1, hs // 2, 2)
        v0, v1 = pairs[..., 0], pairs[..., 1]
        return np.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], axis=-1).reshape(-1)

    def forward(self, token, pos, streams, modes):
        """The logits after token at pos; counts each attention step's mode."""
        hs, kv_mul = self.head_size, self.n_heads // self.n_kv_heads
        x = self.emb[token].copy()
        for l in range(self.n_layers):
            xb = rmsnorm(x, self.rms_att[l])
            q = self.rope(self.wq[l] @ xb, pos)
            k = self.rope(self.wk[l] @ xb, pos)
            v = self.wv[l] @ xb
            att = np.empty(self.dim, dtype=np.float32)
            for g, stream in enumerate(streams[l]):
                stream.append(k[g * hs:(g + 1) * hs].reshape(1, hs),
                              v[g * hs:(g + 1) * hs].reshape(1, hs))
                for h in range(g * kv_mul, (g + 1) * kv_mul):
                    att[h * hs:(h + 1) * hs], stats = stream.decode(q[h * hs:(h + 1) * hs])
                    modes[stats["mode"]] += 1
            x += self.wo[l] @ att
            xb = rmsnorm(x, self.rms_ffn[l])
            h1, h3 = self.w1[l] @ xb, self.w3[l] @ xb
            x += self.w2[l] @ (h1 * (np.float32(1) / (np.float32(1) + np.exp(-h1))) * h3)
        return self.wcls @ rmsnorm(x, self.rms_final)


def rmsnorm(x, weight):
    scale = np.float32(1) / np.sqrt(np.dot(x, x) / np.float32(x.size) + np.float32(1e-5))
    return weight * (scale * x)


class Tokenizer:
    """A llama2.c tokenizer: max token length, then per token its score,
    length and bytes."""

    def __init__(self, path, vocab_size):
        with open(path, "rb") as f:
            raw = f.read()
        at = 4
        self.vocab, self.score = [], []
        for _ in range(vocab_size):
            score, n = np.frombuffer(raw, np.float32, 1, at)[0], int.from_bytes(
                raw[at + 4:at + 8], "little", signed=True)
            self.vocab.append(raw[at + 8:at + 8 + n])
            self.score.append(float(score))
            at += 8 + n
        self.ids = {piece: i for i, piece in enumerate(self.vocab)}

    def piece(self, prev, token):
        """token's bytes after prev: no leading space right after BOS, and
        <0xXX> as the byte itself (0 as nothing, as a C string)."""
        p = self.vocab[token]
        if prev == BOS and p.startswith(b" "):
            p = p[1:]
        m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", p)
        return bytes([int(m.group(1), 16)]).strip(b"\0") if m else p

    def encode(self, text):
        """BOS, the leading space, then text's code points (their bytes where
        the vocabulary lacks them) merged pair by pair, the best-scoring
        first (the leftmost of equals), as llama2.c encodes."""
        ids = [BOS]
        if text and b" " in self.ids:
            ids.append(self.ids[b" "])
        for ch in text:
            b = ch.encode()
            ids += [self.ids[b]] if b in self.ids else [c + 3 for c in b]
        while True:
            best = None
            for i in range(len(ids) - 1):
                j = self.ids.get(self.vocab[ids[i]] + self.vocab[ids[i + 1]])
                if j is not None and (best is None or self.score[j] > self.score[best[1]]):
                    best = (i, j)
            if best is None:
                return ids
            ids[best[0]:best[0] + 2] = [best[1]]


def generate(model, tok, steps, exact=True, prompt="", echo=None):
    """Greedy decoding: steps positions from BOS (the prompt's tokens first),
    stopping early at BOS as `kmv decode` does. Returns the tokens after
    BOS, their text pieces, the seconds of each position and the count of
    attention steps by stats mode."""
    prompt_ids = tok.encode(prompt) if prompt else [BOS]
    streams = model.streams(exact)
    tokens, pieces, seconds, modes = [], [], [], collections.Counter()
    token = BOS
    try:
        for pos in range(min(steps, model.seq_len)):
            t0 = time.perf_counter()
            logits = model.forward(token, pos, streams, modes)
            seconds.append(time.perf_counter() - t0)
            nxt = prompt_ids[pos + 1] if pos + 1 < len(prompt_ids) else int(np.argmax(logits))
            if nxt == BOS:
                break
            tokens.append(nxt)
            pieces.append(tok.piece(token, nxt))
            if echo:
                echo.write(pieces[-1])
                echo.flush()
            token = nxt
    finally:
        for layer in streams:
            for stream in layer:
                stream.close()
    return tokens, pieces, seconds, modes


def kmv_decode(binary, model_path, tok_path, prompt, steps):
    """`binary decode --exact` on prompt: its text after BOS (stdout, less
    the newline ending it), the positions it ran and its wall time."""
    t0 = time.perf_counter()
    run = subprocess.run([binary, "decode", "--exact", "--model", model_path,
                          "--tokenizer", tok_path, "--prompt", prompt, "--steps", str(steps)],
                         check=True, capture_output=True)
    wall = time.perf_counter() - t0
    ran = re.search(rb"(\d+) positions", run.stderr)
    return run.stdout.removesuffix(b"\n"), int(ran[1]) if ran else steps, wall


def agreeing(pieces, text):
    """How many leading pieces match text."""
    at = n = 0
    for p in pieces:
        if text[at:at + len(p)] != p:
            break
        at, n = at + len(p), n + 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=data_file("stories260K/stories260K.bin"))
    ap.add_argument("--tokenizer", default=data_file("stories260K/tok512.bin"))
    ap.add_argument("--steps", type=int, default=None,
                    help="positions to run, prompt included (default: the model's seq_len, "
                         "as kmv decode)")
    ap.add_argument("--prompt", default="", help="text after BOS (default: none)")
    ap.add_argument("--approx", action="store_true",
                    help="approximate attention where certified (kmv's default eps, delta)")
    ap.add_argument("--compare", metavar="KMV_BINARY",
                    help="check against KMV_BINARY decode --exact")
    args = ap.parse_args(argv)
    model = Model(args.model)
    tok = Tokenizer(args.tokenizer, model.vocab_size)
    steps = min(args.steps or model.seq_len, model.seq_len)
    if steps < 1:
        ap.error("--steps must be >= 1")

    tokens, pieces, seconds, modes = generate(model, tok, steps, not args.approx, args.prompt,
                                              echo=sys.stdout.buffer)
    print()
    total = sum(seconds)
    print(f"numpy+kmv: {len(seconds)} positions in {total:.3f} s, "
          f"{len(seconds) / total:.1f} tokens/s (median {1e3 * np.median(seconds):.2f} ms, "
          f"slowest {1e3 * max(seconds):.2f} ms)")
    print(f"attention steps: {sum(modes.values())}, approximated {modes['approx']} (by mode: "
          + ", ".join(f"{m} {n}" for m, n in sorted(modes.items())) + ")")
    if not args.compare:
        return 0

    theirs, ran, wall = kmv_decode(args.compare, args.model, args.tokenizer, args.prompt, steps)
    print(f"kmv decode --exact: {ran} positions in {wall:.3f} s (the whole process), "
          f"{ran / wall:.1f} tokens/s")
    ours = b"".join(pieces)
    n = agreeing(pieces, theirs)
    if ours == theirs:
        print(f"AGREE: all {len(tokens)} tokens after BOS match kmv decode --exact")
        return 0
    print(f"DISAGREE: the first {n} of {len(tokens)} tokens match kmv decode --exact; "
          f"then ours {b''.join(pieces[n:n + 8])!r}, kmv's "
          f"{theirs[len(b''.join(pieces[:n])):][:40]!r}")
    return 0 if args.approx else 1


if __name__ == "__main__":
    sys.exit(main())
