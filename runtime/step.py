"""The step functions: a request's encode and prefill, and one decode step of every sequence.

Every sequence in flight holds a row in the cache of each segment it reaches (runtime.kv). A
decode step runs each engine once for all the rows that reach it, whatever their paths:

  input ids [n0, 1] -> embed -> segment.0 over the n0 rows of its cache
    -> the rows going deeper, in segment.1's row order (one index_select), cross-attention first
       for those with media -> segment.1 -> ... ; each segment's exit rows are copied into the
       head's input in segment 0's row order
  -> lm_head [n0, V] -> sampling on the device -> one copy of the new ids to the host

Nothing is concatenated or allocated per step. With CUDA graphs, the embedding, the segments and
the head run from buffers kept per batch size (a bucket: 1, 2, 4, ... up to max_batch, the rows
rounded up to it) as captured runs: each session replays the graph it captured for its bucket's
buffers (exporters.EngineSession); the spare rows of a bucket are cache rows no sequence holds.
The cross-attention blocks, whose media length varies per request, run uncaptured. A prompt's
prefill runs uncaptured too, one sequence at a time (GroupQueryAttention takes several new
tokens after a past for one row only), in chunks of at most the export's `seq`, segment by
segment so that the confidence policy can stop at an exit; with `prefill_padding` each chunk runs
padded to one of a few lengths warmed at start (a GPU session's first run at a new length is slow),
and with the prefix cache each segment's row starts from the prompt's cached blocks.

Self-speculation (runtime/speculation.py) needs two things of the step. A drafting sequence runs
only its first segments in a decode step (`Row.draft`), though it holds rows in the deeper caches:
a deeper segment that runs for other sequences carries its row along without advancing its length,
so the entry written there lands past its own and is overwritten by the verification. Its hidden
state at the draft exit is kept per drafted position, and `verify` runs those positions through the
deeper segments as one chunk after its past, like a prompt chunk, scoring each at its exit;
`truncate` then drops the rejected entries from every segment by its length alone. With a
quantized draft (`draft_engines`: a weight-quantized export of the same model), a step in which
every sequence drafts runs that export's engines, which read fewer bytes; their cache entries are
the quantized layers', so the verification then runs the drafted tokens through every segment from
the embedding, rewriting those entries with the full model's.
"""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from contract.engines import EXPORT_DTYPES, cross_attn_engine, cross_kv_engine, segment_engine, total_sequence_length
from contract.exits import Exits
from contract.manifest import Manifest
from exporters import host_values
from runtime.engines import EngineSet
from runtime.config import PrefixCacheConfig
from runtime.kv import BlockPool, SegmentCache
from runtime.prefix import PrefixCache
from runtime.requests import Timeline

SILENCE_LOG_MEL = -1.5  # log-mel of silence after Whisper's scaling: the static graph's audio placeholder


def captured_engines(manifest: Manifest) -> list[str]:
    """The engines a decode step replays as CUDA graphs: their shapes are fixed by the batch alone
    (a segment's cache capacity is fixed when the runtime allocates it; cross-attention's media
    length is not)."""
    return ["embed", *(segment_engine(k) for k in range(Exits.of(manifest).segments)), "lm_head"]


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes decode steps are captured at: powers of two, and max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


def bucket_for(n: int, buckets: list[int] | None) -> int:
    """The captured batch size that n rows run at (n itself without graphs)."""
    if buckets is None:
        return n
    return next(b for b in buckets if b >= n)


@dataclass
class Media:
    """A request's media: tokens (until prefill has made every block's keys/values), mask, keys/values per block."""

    mask: torch.Tensor  # [1, M] bool
    tokens: torch.Tensor | None = None  # [1, M, D]
    cross_kv: dict[int, torch.Tensor] = field(default_factory=dict)  # block k -> [2, 1, Hkv, M, hd]


class DeviceMarks:
    """A prefill's timeline marks, each taken when the device has finished the part rather than when
    the host queued it: on a GPU the host runs ahead of the engines, and a mark on its clock would put
    a part's time into whichever later part first waits for the device. After each part a CUDA event
    is recorded on `device`'s stream (made to wait for the part's own device first); once the last has
    completed, each mark is its host time less the device time between them. Elsewhere, the host clock."""

    def __init__(self, timeline: Timeline, device: torch.device):
        self.timeline, self.device = timeline, torch.device(device)
        self.events: list[tuple[str, torch.cuda.Event]] = []

    def mark(self, part: str, device: torch.device) -> None:
        if self.device.type != "cuda":
            self.timeline.mark(part)
            return
        stream = torch.cuda.current_stream(self.device)
        if torch.device(device) != self.device:
            stream.wait_stream(torch.cuda.current_stream(device))
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        self.events.append((part, event))

    def settle(self) -> None:
        """Wait for the last part and put every mark on the timeline."""
        if not self.events:
            return
        last = self.events[-1][1]
        last.synchronize()
        now = time.perf_counter()
        self.timeline.marks += [(part, now - event.elapsed_time(last) / 1e3) for part, event in self.events]
        self.events = []


@dataclass(eq=False)
class Row:
    """What a decode step needs of one sequence."""

    key: Hashable
    depth: int  # segments it holds cache rows in: its path's depth
    token: int  # its next input id
    media: Media | None = None
    draft: int = 0  # while drafting: the segments a decode step runs for it (its draft exit's depth); 0: all `depth`

    @property
    def step_depth(self) -> int:
        return self.draft or self.depth


@dataclass(frozen=True)
class SegmentRows:
    """One segment's rows in a decode step, as index tensors on the segment's device (None: no such row)."""

    count: int  # the cache rows it runs: every sequence holding one
    from_previous: torch.Tensor | None  # each row's index among the previous segment's rows (None for segment 0)
    advance: torch.Tensor | None  # [count] int32: 1 for the rows this step runs, 0 for drafting rows carried along; None: all run
    media: torch.Tensor | None  # its running rows with media, which run the cross-attention block first
    media_keys: tuple[Hashable, ...]  # their sequences, in that order
    exits: torch.Tensor | None  # its rows that exit here
    head_rows: torch.Tensor | None  # where their hidden states go in the head's input (segment 0's order, on the head's device)
    all_exit: bool  # every row exits here, in segment 0's order (one sequence always): the head's input is a plain copy
    drafts: torch.Tensor | None  # its drafting rows that exit here: their hidden states are kept for the verification
    draft_keys: tuple[Hashable, ...]  # their sequences, in that order


@dataclass(frozen=True)
class StepPlan:
    """Where a decode step finds every sequence: made for one membership of the caches, and made
    again when a sequence joins or leaves."""

    members: tuple[tuple[Hashable, ...], ...]  # each segment's sequences in row order: the membership it is for
    step_depths: tuple[tuple[int, bool], ...]  # segment 0's sequences' step depths and whether each drafts: what it is for too
    segments: tuple[SegmentRows, ...]  # the segments some sequence runs this step (a sequence holds a row in each up to its depth)


@dataclass(frozen=True)
class SegmentBuffers:
    hidden: torch.Tensor  # [b, 1, D] its input: segment 0's is the embedding's output
    hidden_out: torch.Tensor  # [b, 1, D]
    exit_hidden: torch.Tensor  # [b, 1, D]


@dataclass(frozen=True)
class DecodeBuffers:
    """The tensors a decode step at one batch size runs its engines from, each on its engine's
    device: made at that size's first step and kept, since its captured graphs replay these addresses."""

    input_ids: torch.Tensor  # [b, 1] int64, the embedding's input
    segments: tuple[SegmentBuffers, ...]
    exit_hidden: torch.Tensor  # [b, D] the head's input
    logits: torch.Tensor  # [b, V]


class Stepper:
    def __init__(self, engines: EngineSet, max_batch: int, capacity: int, cuda_graphs: bool, draft_engines: EngineSet | None = None,
                 prefix_cache: PrefixCacheConfig | None = None, prefill_padding: bool = False):
        self.engines = engines
        self.draft_engines = draft_engines  # a quantized export of the same model, for steps in which every sequence drafts
        manifest: Manifest = engines.manifest
        self.manifest = manifest
        self.dtype = EXPORT_DTYPES[manifest.dtype]
        text = manifest.model["config"]["text"]
        self.n_segments = Exits.of(manifest).segments
        self.dim, self.vocab = text["dim"], text["vocab_size"]
        self.capacity = capacity
        self.chunk = manifest.dims["seq"]["max"]
        self.prefill_lengths = prefill_lengths(self.chunk, prefill_padding)
        self.head_device = engines.device("lm_head")
        self.caches = []
        for k in range(self.n_segments):
            past = next(t for t in manifest.engines[segment_engine(k)].inputs if t["name"] == "past_key.0")
            _, kv_heads, _, head_dim = past["shape"]
            first, end = manifest.engines[segment_engine(k)].layers
            self.caches.append(SegmentCache(end - first, max_batch, kv_heads, capacity, head_dim, self.dtype,
                                            engines.device(segment_engine(k))))
        self.prefix = make_prefix_cache(self.caches, prefix_cache) if prefix_cache is not None and prefix_cache.enabled else None
        self.prefix_exact = prefix_cache is not None and prefix_cache.exact
        self.buckets = batch_buckets(max_batch) if cuda_graphs else None
        self.buffers: dict[int, DecodeBuffers] = {}  # batch size -> its buffers
        self.decode_total = torch.tensor(capacity, dtype=torch.int32)  # a CPU input of the engine, one address for every replay
        self.step_plan: StepPlan | None = None
        self.media_batches: dict[int, tuple[tuple, dict]] = {}  # block -> (its rows' keys, batched media)
        # the next input ids, written on the host through a numpy view (no tensor per step), then one copy to the device
        self.token_host = torch.zeros(max_batch, dtype=torch.int64, pin_memory=self.head_device.type == "cuda")
        self.token_slots = self.token_host.numpy()
        # where a step's engines run on a GPU they are queued and run while the host goes on (it waits for the
        # logits in sampling); on the CPU each runs in the calling thread, without the GIL
        self.asynchronous = self.head_device.type == "cuda"
        # drafting sequence -> its draft-exit hidden state [1, 1, D] per drafted position (none with a quantized draft)
        self.drafted: dict[Hashable, list[torch.Tensor]] = {}

    # --- encode: once per request ---------------------------------------------------------------

    def encode(self, pixel_values: torch.Tensor | None, mel: torch.Tensor | None, static: bool) -> Media:
        """Media tokens [1, M, D]: the image's, then the audio's. The static graph always runs both
        encoders, on placeholders where a modality is absent (masked, so the answer is unchanged)."""
        parts, masks = [], []
        records = self.manifest.engines
        if pixel_values is not None or static:
            images = pixel_values if pixel_values is not None else torch.zeros(1, 3, *records["vision"].inputs[0]["shape"][2:])
            tokens = self.engines.run("vision", {"pixel_values": images.to(self.dtype)})["image_tokens"]
            tokens = tokens.reshape(1, -1, tokens.shape[-1])  # several images follow each other
            parts.append(tokens)
            masks.append(torch.full(tokens.shape[:2], pixel_values is not None))
        if mel is not None or static:
            frames = 0 if mel is None else mel.shape[-1]
            if static:  # the full length the encoder was exported for, silence past the real audio
                n_mels = records["audio"].inputs[0]["shape"][1]
                full = torch.full((1, n_mels, self.manifest.dims["audio_frames"]["max"]), SILENCE_LOG_MEL)
                if mel is not None:
                    full[..., :frames] = mel
                mel = full
            tokens = self.engines.run("audio", {"mel": mel.to(self.dtype)})["audio_tokens"]
            per_token = self.manifest.dims["audio_frames"]["multiple"]
            mask = torch.zeros(tokens.shape[:2], dtype=torch.bool)
            mask[:, :frames // per_token] = True
            parts.append(tokens)
            masks.append(mask)
        device = parts[0].device
        return Media(torch.cat(masks, dim=1).to(device), torch.cat([p.to(device) for p in parts], dim=1))

    # --- prefill: one sequence, segment by segment ----------------------------------------------------

    def prefill(self, key: Hashable, prompt_ids: list[int], depth: int, media: Media | None,
                stop: Callable[[torch.Tensor, int], bool] | None = None, root: Hashable | None = None,
                marks: DeviceMarks | None = None) -> tuple[torch.Tensor, int]:
        """Fill the sequence's rows with its prompt; logits [1, V] of the last position at the exit, and
        the depth reached: `depth` segments, or fewer where `stop(logits, segments run)` says so.

        With the prefix cache and a `root` (runtime.prefix.media_root), each segment's row first takes
        the prompt's cached blocks and prefills the positions after them; the prompt's whole blocks are
        kept for later prompts. Positions are prefilled in chunks that end where an uncached prefill's
        end (multiples of the export's seq), so past the first chunk the engines run the same shapes.
        Exact (runtime.prefix_cache.exact), positions are reused and kept in whole chunks only: every
        position is then computed in the shapes the uncached prefill computes it in, and a GPU's kernels,
        whose rounding depends on the shape, give the same bits.
        `marks` (the request's timeline) are taken after the embedding, each segment and the head, and
        told the prompt tokens taken from the cache."""
        n = len(prompt_ids)
        marks = marks or DeviceMarks(Timeline(), self.head_device)
        prefix = self.prefix if root is not None else None
        chain, blocks = prefix.match(root, prompt_ids, depth) if prefix else ([], [0] * depth)
        cached = [c * prefix.block_tokens // self.prefix_unit * self.prefix_unit for c in blocks] if prefix else blocks  # per segment
        start = marks.timeline.cached_tokens = cached[0] if depth else 0
        device = self.engines.device("embed")
        prompt = host_values([prompt_ids], device)
        hidden = join([self.embed(prompt[:, a:b]) for a, b in self.spans(start, n)])
        marks.mark("embed", device)
        for k in range(depth):
            cache = self.caches[k]
            row = cache.add(key)
            first = cached[k]
            if first:
                prefix.load(k, row, chain, first // prefix.block_tokens)
            hidden = hidden[:, first - start:]  # [1, n - first, D]: segment k's new positions
            start = first
            if media is not None:
                media.cross_kv[k] = self.engines.run(cross_kv_engine(k), {"media": media.tokens})["cross_kv"]
            outs = [self.extend(k, row, hidden[:, a - first:b - first], a, media) for a, b in self.spans(first, n)]
            hidden = join([out["hidden_out"] for out in outs])
            cache.lengths[row] = n
            if prefix:
                prefix.save(root, prompt_ids[:n // self.prefix_unit * self.prefix_unit], k, row)
            marks.mark(f"segment.{k}", cache.device)
            if stop is not None and k + 1 < depth:
                logits = self.head(outs[-1]["exit_hidden"][:, -1])
                if stop(logits, k + 1):
                    depth = k + 1
                    break
        else:
            logits = self.head(outs[-1]["exit_hidden"][:, -1])
        marks.mark("head", self.head_device)
        if media is not None:
            media.tokens = None  # decode steps need only the keys/values
        return logits, depth

    @property
    def prefix_unit(self) -> int:
        """The prompt positions the prefix cache reuses and keeps come in multiples of this: whole
        prefill chunks when exact, else whole blocks (GenerationEngine checks that blocks divide chunks)."""
        return self.chunk if self.prefix_exact else self.prefix.block_tokens

    def spans(self, first: int, end: int) -> list[tuple[int, int]]:
        """Positions first..end in chunks of at most the export's seq, cut at its multiples."""
        edges = [first, *range((first // self.chunk + 1) * self.chunk, end, self.chunk), end]
        return list(zip(edges[:-1], edges[1:]))

    def extend(self, k: int, row: int, hidden: torch.Tensor, past: int, media: Media | None) -> dict[str, torch.Tensor]:
        """Segment k over one sequence's chunk of new positions [1, s, D] after the `past` entries its
        cache row holds (its cross-attention block first, with media): the segment's outputs."""
        s = hidden.shape[1]
        n = self.padded(s, past)
        hidden = pad_to(hidden, 1, n)
        if media is not None:
            hidden = self.cross_attention(k, hidden, media.cross_kv[k], media.mask)
        seqlens = [past + n - 1]  # on the host: the total below needs no device sync
        total = torch.tensor(total_sequence_length(n, self.capacity, torch.tensor(seqlens)), dtype=torch.int32)
        out = self.engines.run(segment_engine(k), {"hidden": hidden, "seqlens_k": host_values(seqlens, self.caches[k].device, torch.int32),
                                                   "total_sequence_length": total, **self.caches[k].feeds(slice(row, row + 1))})
        return {"hidden_out": out["hidden_out"][:, :s], "exit_hidden": out["exit_hidden"][:, :s]}

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding of one sequence's ids [1, s]: [1, s, D], run at a prefill length."""
        s = ids.shape[1]
        return self.engines.run("embed", {"input_ids": pad_to(ids, 1, self.padded(s, 0))})["hidden"][:, :s]

    def padded(self, s: int, past: int) -> int:
        """The length a chunk of s new positions after `past` cached ones runs at: the first prefill
        length that holds it and fits the row, else s. A session's first run at a new length is slow on
        a GPU (ONNX Runtime plans its memory and picks kernels per shape) and a server sees a new prompt
        length with nearly every request, so chunks run at a few lengths, warmed at start
        (`warm_prefill`). The padding is causal: it follows the chunk's positions, which never attend to
        it, and its cache entries lie past the row's length, where nothing reads them."""
        return next((n for n in self.prefill_lengths if n >= s and past + n <= self.capacity), s)

    def warm_prefill(self, depth: int | None = None) -> None:
        """One prefill at each prefill length through the first `depth` segments (default: all) on a
        spare row, so that no request pays a session's first run at that length."""
        for n in self.prefill_lengths:
            self.prefill(("warm-up", n), [0] * n, self.n_segments if depth is None else depth, None)
            self.release(("warm-up", n))

    # --- self-speculation: verify a sequence's drafted positions, keep what was accepted ------------------

    def verify(self, row: Row, past: int, fed: list[int]) -> torch.Tensor:
        """The positions a drafting sequence fed since its verification before (`fed`, their tokens)
        through the segments past its draft exit (their kept draft-exit hidden states), or with a
        quantized draft through every segment, as one chunk after the `past` entries they hold:
        logits [m, V] at its own exit, one row per position."""
        if self.draft_engines is None:
            first, hidden = row.draft, torch.cat(self.drafted.pop(row.key), dim=1)  # [1, m, D]
        else:
            first, hidden = 0, self.embed(host_values([fed], self.engines.device("embed")))
        for k in range(first, row.depth):
            out = self.extend(k, self.caches[k].row(row.key), hidden, past, row.media)
            hidden = out["hidden_out"]
        return self.head(out["exit_hidden"][0])

    def truncate(self, key: Hashable, length: int) -> None:
        """Every segment's cache of this sequence keeps its first `length` entries (rejected drafts
        are dropped by the lengths alone: the next writes overwrite them)."""
        for cache in self.caches:
            if key in cache.members:
                cache.lengths[cache.row(key)] = length

    def cross_attention(self, k: int, hidden: torch.Tensor, cross_kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.engines.run(cross_attn_engine(k), {"hidden": hidden, "cross_kv": cross_kv, "media_mask": mask})["hidden_out"]

    def head(self, exit_hidden: torch.Tensor) -> torch.Tensor:
        return self.engines.run("lm_head", {"exit_hidden": exit_hidden})["logits"]

    def release(self, key: Hashable) -> None:
        self.drafted.pop(key, None)
        for cache in self.caches:
            if key in cache.members:
                cache.remove(key)

    # --- decode: one step of every sequence --------------------------------------------------------

    def decode(self, rows: list[Row], meanwhile: Callable[[], None] | None = None) -> tuple[list[Hashable], torch.Tensor]:
        """One token of every sequence in flight: (their keys in segment 0's row order, logits [n, V] in that order).
        `meanwhile` is called once, when the engines will keep the device busy without the GIL for a while:
        on the CPU right before segment 0 runs, on a GPU once every engine of the step is queued."""
        by_key = {r.key: r for r in rows}
        plan = self.plan(by_key)
        keys = plan.members[0]
        n0 = len(keys)
        # every sequence drafting: every engine this step runs is some draft's, the quantized one where there is one
        engines = self.draft_engines if self.draft_engines is not None and all(r.draft for r in rows) else self.engines
        bufs = self.decode_buffers(bucket_for(n0, self.buckets))  # the embedding's and the head's
        for i, key in enumerate(keys):
            self.token_slots[i] = by_key[key].token
        bufs.input_ids[:n0, 0].copy_(self.token_host[:n0], non_blocking=True)
        self.run_embed(bufs, engines)
        hidden = bufs.segments[0].hidden
        for k, at in enumerate(plan.segments):
            b = bucket_for(at.count, self.buckets)
            seg = self.decode_buffers(b).segments[k]
            x = seg.hidden
            if k:  # the rows going on, in this segment's row order
                torch.index_select(hidden.to(x.device), 0, at.from_previous, out=x[:at.count])
            if meanwhile is not None and not self.asynchronous:
                meanwhile()
                meanwhile = None
            if at.media is not None:
                media = self.block_media(k, [by_key[m] for m in at.media_keys])
                x[at.media] = self.cross_attention(k, x[at.media], media["cross_kv"], media["media_mask"]).to(x.device)
            self.run_segment(k, b, engines)
            self.caches[k].lengths[:at.count].add_(1 if at.advance is None else at.advance)  # in place: `+=` on a slice writes it back too
            if at.all_exit:
                bufs.exit_hidden[:at.count].copy_(seg.exit_hidden[:at.count, 0])
            elif at.exits is not None:
                bufs.exit_hidden.index_copy_(0, at.head_rows, seg.exit_hidden[:, 0].index_select(0, at.exits).to(self.head_device))
            if at.drafts is not None and self.draft_engines is None:  # a quantized draft's verification starts from the embedding
                kept = seg.hidden_out.index_select(0, at.drafts)  # [m, 1, D], out of the buffer the next step overwrites
                for i, key in enumerate(at.draft_keys):
                    self.drafted.setdefault(key, []).append(kept[i:i + 1])
            hidden = seg.hidden_out
        self.run_head(bufs, engines)
        if meanwhile is not None:
            meanwhile()
        return list(keys), bufs.logits[:n0]

    def run_captured(self, name: str, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                     engines: EngineSet | None = None) -> None:
        """A decode-step run of an engine from its bucket's buffers: captured where steps run in buckets."""
        (engines or self.engines).session(name).run(feeds, outputs, captured=self.buckets is not None)

    def run_embed(self, bufs: DecodeBuffers, engines: EngineSet | None = None) -> None:
        self.run_captured("embed", {"input_ids": bufs.input_ids}, {"hidden": bufs.segments[0].hidden}, engines)

    def run_segment(self, k: int, batch: int, engines: EngineSet | None = None) -> None:
        """Segment k's decode step over its first `batch` cache rows, from its buffers at that batch size."""
        seg, cache = self.decode_buffers(batch).segments[k], self.caches[k]
        cache.allocate()  # a capture at start-up runs on spare rows before any sequence has come
        self.run_captured(segment_engine(k), {"hidden": seg.hidden, "seqlens_k": cache.lengths[:batch],
                                              "total_sequence_length": self.decode_total, **cache.feeds(slice(0, batch))},
                          {"hidden_out": seg.hidden_out, "exit_hidden": seg.exit_hidden}, engines)

    def run_head(self, bufs: DecodeBuffers, engines: EngineSet | None = None) -> None:
        self.run_captured("lm_head", {"exit_hidden": bufs.exit_hidden}, {"logits": bufs.logits}, engines)

    def replay(self, batch: int, depth: int) -> None:
        """A decode step's engines alone at one batch size, on whatever their buffers hold: embed,
        `depth` segments (each reading its own input buffer) and the head."""
        bufs = self.decode_buffers(batch)
        self.run_embed(bufs)
        for k in range(depth):
            self.run_segment(k, batch)
        self.run_head(bufs)

    def plan(self, rows: dict[Hashable, Row]) -> StepPlan:
        """The step plan of the caches' membership and the rows' step depths now: the last one while
        nobody joined, left, or started or stopped drafting."""
        members = tuple(tuple(c.members) for c in self.caches)
        depths = tuple((rows[m].step_depth, bool(rows[m].draft)) for m in members[0])
        if self.step_plan is None or self.step_plan.members != members or self.step_plan.step_depths != depths:
            self.step_plan = self.make_plan(members, depths, rows)
        return self.step_plan

    def make_plan(self, members: tuple[tuple[Hashable, ...], ...], depths: tuple[tuple[int, bool], ...],
                  rows: dict[Hashable, Row]) -> StepPlan:
        def index(positions: list[int], device: torch.device) -> torch.Tensor | None:
            return host_values(positions, device) if positions else None

        first = {m: i for i, m in enumerate(members[0])}
        segments = []
        for k, here in enumerate(members):
            runs = [rows[m].step_depth > k for m in here]
            if not any(runs):
                break
            device = self.caches[k].device
            previous = {m: i for i, m in enumerate(members[k - 1])} if k else {}
            advance = None if all(runs) else host_values(runs, device, torch.int32)
            media = [i for i, m in enumerate(here) if runs[i] and rows[m].media is not None]
            exits = [i for i, m in enumerate(here) if rows[m].step_depth == k + 1]
            drafts = [i for i in exits if rows[here[i]].draft]
            head_rows = [first[here[i]] for i in exits]
            segments.append(SegmentRows(len(here), index([previous[m] for m in here], device) if k else None, advance,
                                        index(media, device), tuple(here[i] for i in media),
                                        index(exits, device), index(head_rows, self.head_device),
                                        exits == head_rows == list(range(len(here))),
                                        index(drafts, device), tuple(here[i] for i in drafts)))
        return StepPlan(members, depths, tuple(segments))

    def decode_buffers(self, batch: int) -> DecodeBuffers:
        if batch not in self.buffers:
            def zeros(engine: str, *shape: int, dtype: torch.dtype = self.dtype) -> torch.Tensor:
                return torch.zeros(shape, dtype=dtype, device=self.engines.device(engine))

            b, dim = batch, self.dim
            segments = tuple(SegmentBuffers(zeros(name, b, 1, dim), zeros(name, b, 1, dim), zeros(name, b, 1, dim))
                             for name in map(segment_engine, range(self.n_segments)))
            self.buffers[batch] = DecodeBuffers(zeros("embed", b, 1, dtype=torch.int64), segments,
                                                zeros("lm_head", b, dim), zeros("lm_head", b, self.vocab))
        return self.buffers[batch]

    def block_media(self, k: int, rows: list[Row]) -> dict:
        """Block k's media keys/values for these rows, padded to the longest media; kept while the rows stay the same."""
        if len(rows) == 1:
            return {"cross_kv": rows[0].media.cross_kv[k], "media_mask": rows[0].media.mask}
        key = tuple(r.key for r in rows)
        cached = self.media_batches.get(k)
        if cached and cached[0] == key:
            return cached[1]
        length = max(r.media.mask.shape[1] for r in rows)
        media = {"cross_kv": torch.cat([pad_to(r.media.cross_kv[k], 3, length) for r in rows], dim=1),
                 "media_mask": torch.cat([pad_to(r.media.mask, 1, length) for r in rows])}
        self.media_batches[k] = (key, media)
        return media

    def capture(self, depth: int | None = None) -> None:
        """Capture every bucket's decode graphs of the first `depth` segments (default: all) now, on
        spare rows and on the calling thread, rather than in the first requests' steps; a segment loaded
        later, or a decode on another thread, captures in its first steps (a session may keep its
        graphs per thread). A load in progress holds the captures off until it is done."""
        if self.buckets is None:
            return
        depth = self.n_segments if depth is None else depth
        names = ["embed", *(segment_engine(k) for k in range(depth)), "lm_head"]
        for b in self.buckets:
            while any(self.engines.session(name).needs_capture(b) for name in names):
                self.replay(b, depth)
        if any(c.device.type == "cuda" for c in self.caches):
            torch.cuda.synchronize()

    def free_unloaded(self) -> list[int]:
        """Free the KV buffers of segments whose engine is unloaded and that no sequence holds a row of."""
        freed = [k for k, cache in enumerate(self.caches)
                 if cache.buffer is not None and not cache.members and not self.engines.resident(segment_engine(k)) and cache.free()]
        if freed:
            self.step_plan = None
        return freed

    def kv_allocated(self) -> Counter[str]:
        """KV bytes allocated now, per device."""
        out: Counter[str] = Counter()
        for cache in self.caches:
            out[str(cache.device)] += cache.allocated_bytes
        return out

    def kv_bytes_per_request(self, depth: int) -> int:
        """The KV bytes a sequence of this depth holds: a row in each segment it reaches."""
        return sum(c.bytes_per_row for c in self.caches[:depth])


def prefill_lengths(chunk: int, padding: bool) -> list[int]:
    """The lengths prompt chunks run at: powers of two from 16 below the export's seq, then the seq
    itself; none (every chunk at its own length) without padding."""
    return [n for n in (1 << i for i in range(4, chunk.bit_length())) if n < chunk] + [chunk] if padding else []


def make_prefix_cache(caches: list[SegmentCache], cfg: PrefixCacheConfig) -> PrefixCache | None:
    """The prefix cache over these segments: each device's `memory_gb` shared among its segments by
    their layers (a segment's blocks are its layers' entries); None when no segment has room for a block."""
    layers: Counter[str] = Counter()
    for cache in caches:
        layers[str(cache.device)] += cache.layers
    pools = [BlockPool(cache, cfg.block_tokens, cfg.memory_gb * 2**30 * cache.layers / layers[str(cache.device)]) for cache in caches]
    return PrefixCache(pools, cfg.block_tokens) if any(p.blocks for p in pools) else None


def join(parts: list[torch.Tensor]) -> torch.Tensor:
    """Chunks of positions [1, s_i, D] as one [1, sum s_i, D]."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def pad_to(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Zero/False-pad dimension `dim` of t up to `length`."""
    if t.shape[dim] == length:
        return t
    shape = list(t.shape)
    shape[dim] = length - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)
