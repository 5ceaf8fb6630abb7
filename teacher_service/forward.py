"""A batch's forward passes, reduced to the hidden states of the rows that are scored.

Trainers score completions: a 384-token prompt with a 128-token completion asks for 128
rows, but `model(...).logits` applies the output layer (a [H, V] matmul) to all 512
positions and materialises [B, L, V]. Here the model's body runs over the tokens, and only
the scored rows' hidden states (positions score_from - 1 .. L - 2, plus L - 1 when the
next token is sampled) are kept, as one [N, H] matrix; the output layer is applied to
them later, in chunks (backend.py), so memory never scales with L x V.

Sequences that share a prefix (a trainer's n samples of one prompt) run it once: the
prefix goes through the body with a KV cache, the cache is repeated for the n
suffixes, and the suffixes run against it. A right-padded batch under a causal mask, or a
suffix after a cache, gives every position the same hidden state it would have alone (to
float rounding), so results do not depend on batching or sharing.

Sequences that share nothing are packed: several short ones fill a row as wide as the
longest, their position ids restarting at 0. Given position ids and neither an attention
mask nor a cache, transformers' mask keeps each sequence to itself (sdpa and eager through
a block-diagonal mask, flash-attention through its variable-length kernel), so the padding
that length grouping leaves is not computed. backend.py checks this at load as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from causal_lm.placement import execution_devices, module_device
from causal_lm.sampling import cache_argument
from teacher_service.backend_api import ScoreItem

MIN_SHARED_TOKENS = 16  # a shorter common prefix is not worth a forward of its own


@dataclass
class ScoredRows:
    """The hidden states a batch's scoring needs, item by item in batch order."""

    rows: list[torch.Tensor]  # item i: [T_i, H], T_i = len - score_from
    next_rows: list[torch.Tensor | None]  # item i: [1, H] when it samples the next token
    computed_tokens: int  # positions the forwards ran, padding included
    padding_tokens: int  # of those, padding


def _shared_groups(items: list[ScoreItem]) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """([(prefix length, item indices)], the other indices): items whose fed tokens share a
    prefix of at least MIN_SHARED_TOKENS, every suffix keeping at least one token."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for n, item in enumerate(items):
        if item.forward_len > MIN_SHARED_TOKENS:
            buckets.setdefault(tuple(item.token_ids[:MIN_SHARED_TOKENS].tolist()), []).append(n)
    groups, grouped = [], set()
    for members in buckets.values():
        if len(members) < 2:
            continue
        fed = [items[n].token_ids[: items[n].forward_len] for n in members]
        shortest = min(len(ids) for ids in fed)
        same = torch.stack([ids[:shortest] for ids in fed]).eq(fed[0][:shortest]).all(dim=0)
        common = int(same.long().cumprod(0).sum())
        groups.append((min(common, shortest - 1), members))
        grouped.update(members)
    return groups, [n for n in range(len(items)) if n not in grouped]


def packed_rows(lengths: list[int]) -> list[list[int]]:
    """Indices of the sequences each packed row holds: first fit, longest first, into rows as
    wide as the longest sequence (so no row's attention is wider than padding would make it)."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []
    for n in sorted(range(len(lengths)), key=lambda n: -lengths[n]):
        row = next((r for r, free in enumerate(room) if free >= lengths[n]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(n)
        room[row] -= lengths[n]
    return rows


def padded(ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, W] (pad 0, never attended to) and their attention mask."""
    width = max(len(row) for row in ids)
    input_ids = torch.zeros((len(ids), width), dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for n, row in enumerate(ids):
        input_ids[n, : len(row)] = row
        attention_mask[n, : len(row)] = 1
    return input_ids, attention_mask


class Body:
    """The model without its output layer, run over batches of ScoreItems. Its inputs go to
    the embedding's device; its hidden states come out on the last layer's
    (causal_lm/placement.py)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.get_decoder()
        self.device = module_device(model.get_input_embeddings())
        # the KV cache's rows are picked per layer, on that layer's device: with layers on
        # several devices the indices stay on the CPU (indexing accepts them on any device)
        self.index_device = self.device if len(execution_devices(model)) == 1 else "cpu"
        self.cache = cache_argument(model)

    def padded_inputs(
        self, ids: list[torch.Tensor], prefixes: list[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """A forward's tensors for right-padded token rows, on the device: input_ids and
        attention_mask [B, W]; after `prefixes` (rows of a KV cache of prefixes[n] tokens,
        padded to a common width P), the mask [B, P + W] lets row n attend to its prefix's
        tokens, not to the prefix's padding, and position_ids [B, W] follow them."""
        input_ids, attention_mask = padded(ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if prefixes is not None:
            seen = torch.zeros((len(ids), max(prefixes)), dtype=torch.long)
            for n, length in enumerate(prefixes):
                seen[n, :length] = 1
            inputs["attention_mask"] = torch.cat([seen, attention_mask], dim=1)
            positions = torch.tensor(prefixes).unsqueeze(1) + torch.arange(input_ids.shape[1])
            inputs["position_ids"] = positions
        return {name: tensor.to(self.device) for name, tensor in inputs.items()}

    def packed_inputs(
        self, ids: list[torch.Tensor], pack: bool
    ) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        """A forward's tensors (on the device) that runs each of `ids` alone, and where each
        one's hidden states come out: (row, first position). Packed (when `pack`) if that
        saves a row: input_ids and position_ids [R, W], W the longest, each sequence's
        positions restarting at 0; else right-padded (padded_inputs)."""
        rows = packed_rows([len(row) for row in ids]) if pack else []
        if not rows or len(rows) == len(ids):
            return self.padded_inputs(ids), [(n, 0) for n in range(len(ids))]
        width = max(len(row) for row in ids)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        where: dict[int, tuple[int, int]] = {}
        for r, members in enumerate(rows):
            start = 0
            for n in members:
                input_ids[r, start : start + len(ids[n])] = ids[n]
                positions[r, start : start + len(ids[n])] = torch.arange(len(ids[n]))
                where[n] = (r, start)
                start += len(ids[n])
            positions[r, start:] = torch.arange(width - start)  # the padding: a sequence of its own
        inputs = {"input_ids": input_ids, "position_ids": positions}
        return {name: t.to(self.device) for name, t in inputs.items()}, [
            where[n] for n in range(len(ids))
        ]

    def run(self, inputs: dict[str, torch.Tensor], cache: object = None) -> torch.Tensor:
        """The final hidden states [B, W, H] of one forward over `inputs`; with `cache`, after
        the rows of that KV cache (which grows by these tokens), else keeping no cache."""
        extra = {"use_cache": False} if cache is None else {"use_cache": True, self.cache: cache}
        return self.model(**inputs, **extra).last_hidden_state

    def hidden(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Final hidden states [B, W, H] of right-padded token rows."""
        return self.run(self.padded_inputs(ids))

    def each(self, ids: list[torch.Tensor], pack: bool) -> tuple[list[torch.Tensor], int]:
        """Each sequence's final hidden states [len_i, H] and the positions the forward ran
        (padding included): packed (when `pack`) if that saves a row, else right-padded."""
        inputs, where = self.packed_inputs(ids, pack)
        hidden = self.run(inputs)
        each = [hidden[r, start : start + len(row)] for (r, start), row in zip(where, ids)]
        return each, hidden.shape[:2].numel()

    def scored_rows(
        self, items: list[ScoreItem], share_prefixes: bool, pack: bool = False
    ) -> ScoredRows:
        """Two forwards at most besides the unshared one: every group's prefix together, then
        every group's suffixes together, after their prefix's rows of the KV cache.

        Every input reaches the device before the first forward is queued (on CUDA a copy
        from pageable memory waits for the device's queue to drain), so no copy of ours
        makes the host wait for a forward; the forwards without a KV cache keep none."""
        rows: list[torch.Tensor | None] = [None] * len(items)
        next_rows: list[torch.Tensor | None] = [None] * len(items)
        groups, alone = _shared_groups(items) if share_prefixes else ([], list(range(len(items))))
        fed = real = 0  # positions the forwards ran, and of them the sequences' own
        if alone:
            ids = [items[n].token_ids[: items[n].forward_len] for n in alone]
            alone_inputs, where = self.packed_inputs(ids, pack)
        if groups:
            prefixes = [items[members[0]].token_ids[:length] for length, members in groups]
            prefix_inputs = self.padded_inputs(prefixes)
            owner = [g for g, (_, members) in enumerate(groups) for _ in members]
            owner_index = torch.tensor(owner, device=self.index_device)
            members = [n for _, group in groups for n in group]
            lengths = [groups[g][0] for g in owner]
            suffixes = [
                items[n].token_ids[length : items[n].forward_len]
                for n, length in zip(members, lengths)
            ]
            suffix_inputs = self.padded_inputs(suffixes, lengths)
        if alone:
            hidden = self.run(alone_inputs)
            fed, real = hidden.shape[:2].numel(), sum(len(row) for row in ids)
            for (r, start), row, n in zip(where, ids, alone):
                own = hidden[r, start : start + len(row)]
                rows[n], next_rows[n] = item_rows(items[n], own[:0], own)
        if groups:
            out = self.model(**prefix_inputs, use_cache=True)
            prefix_hidden, cache = out.last_hidden_state, out[self.cache]
            cache.batch_select_indices(owner_index)  # row n: its group's prefix
            hidden = self.run(suffix_inputs, cache)
            fed += prefix_hidden.shape[:2].numel() + hidden.shape[:2].numel()
            real += sum(len(row) for row in prefixes) + sum(len(row) for row in suffixes)
            for row, (n, g) in enumerate(zip(members, owner)):
                prefix = prefix_hidden[g, : groups[g][0]]
                rows[n], next_rows[n] = item_rows(items[n], prefix, hidden[row])
        return ScoredRows(rows, next_rows, fed, fed - real)  # type: ignore[arg-type]


def item_rows(
    item: ScoreItem, prefix: torch.Tensor, rest: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An item's scored rows, and its last row when it samples the next token, from the
    hidden states of its shared prefix [P, H] (P may be 0) and of what followed [>= 1, H]."""
    shared, length = prefix.shape[0], int(item.token_ids.numel())
    first, end = item.score_from - 1, length - 1  # scored rows: positions first .. end - 1
    pieces = []
    if first < shared:
        pieces.append(prefix[first : min(shared, end)])
    if end > shared:
        pieces.append(rest[max(first, shared) - shared : end - shared])
    scored = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    last = rest[end - shared : length - shared] if item.sample_next else None
    return scored, last
