"""Per-node SAE feature selection (after Yeo et al.): decoder cosine for candidates, attribution for K*.

Attribution of the refusal log-odds to every latent: for each prompt, the SAE is spliced into block
`layer`'s output with its error term kept (so the forward pass is unchanged), the refusal log-odds
at the first generated position is differentiated with respect to every latent's activation at every
token, and the result is summed over the prompt's tokens. A positive value: the latent, as active on
this prompt, pushes the model towards refusing. The log-odds is log P(refusal opener) − log(1 − P),
P summed over the model's refusal-opening tokens.

Two estimators (`steps`): 1 is gradient × activation (attribution patching against zeroing the
latent; one backward pass); n > 1 is integrated gradients (Yeo et al.) along the straight path
from every latent at 0 to every latent at its value, the gradient averaged at the n midpoints of
that path (n backward passes). Integrated gradients sum, over latents and tokens, to the log-odds
change from zeroing every latent (error term kept), to within the quadrature error.

Candidates (`candidate_pool`): the latents whose decoder rows point most along the node's direction,
joined with those pointing most along the pooled refusal direction. A node's difference of means
mixes its topic with the refusal decision, so by its own direction alone the candidates of a node
whose direction is mostly topic are topic latents, and a refusal decision shared with other nodes
never reaches its K* set; the attribution on the node's own prompts then decides which candidates
carry that node's refusal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from refusal_atlas.errors import AtlasError
from refusal_atlas.lm.blocks import decoder_blocks, hidden_from_output, replace_hidden, restored_blocks
from refusal_atlas.lm.capture import accepts_position_ids, left_pad
from refusal_atlas.lm.generation import length_buckets
from refusal_atlas.lm.models import LoadedModel
from refusal_atlas.mechinterp.logit_lens import promoted_tokens
from refusal_atlas.mechinterp.sae.model import SparseAutoencoder
from refusal_atlas.mechinterp.sae.tokens import TokenActivations


def _logodds(logits: Tensor, token_ids: Tensor) -> Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = torch.logsumexp(logp[:, token_ids], dim=-1).clamp(max=-1e-6)
    return lp - torch.log(-torch.expm1(lp))


def attributions(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    layer: int,
    instructions: Sequence[str],
    refusal_token_ids: Sequence[int],
    *,
    batch_size: int = 8,
    steps: int = 1,
    system: str | None = None,
    progress: bool = False,
    last: int = 0,
    baseline: Tensor | None = None,
    reference_states: Mapping[int, Mapping[str, Tensor]] | None = None,
) -> Tensor:
    """[n_prompts, d_sae] attribution of the refusal log-odds, summed over each prompt's tokens.

    `steps` 1: gradient × activation; n > 1: integrated gradients with n midpoint steps (n× the cost).
    `last` n > 0: summed over the last n tokens only (left padding: the same template tokens in every row,
    e.g. the post-instruction tokens where the refusal is decided); 0: every token.
    `baseline` [d_sae]: the latent values the path starts from instead of 0 (e.g. their mean on harmless
    prompts): a latent then counts by how far it moves from its usual value, so latents active at the same
    strength on every prompt carry no attribution.
    `reference_states`: the decoder-block weights of the model this one was fine-tuned from (blocks 0..layer
    used); the path then starts, token by token, from the latents the reference model has on the same tokens,
    so a latent counts by how far the fine-tune moved it on this prompt (exclusive with `baseline`).
    """
    if not refusal_token_ids:
        raise AtlasError("attribution needs the model's refusal-opening token ids (none given)")
    if steps < 1:
        raise AtlasError(f"attribution steps must be at least 1 (got {steps})")
    if not instructions:
        return torch.zeros(0, sae.cfg.d_sae)
    tok = lm.tokenizer
    ids = [tok(lm.chat_prompt(x, system=system), add_special_tokens=False)["input_ids"] for x in instructions]
    target = torch.as_tensor(list(refusal_token_ids), dtype=torch.long)
    block: nn.Module = decoder_blocks(lm.model)[layer]
    device = next(lm.model.parameters()).device
    sae_dev = sae.to(device)
    out = torch.zeros(len(ids), sae.cfg.d_sae)
    slot: dict[str, Any] = {"alpha": 1.0}
    if baseline is not None and reference_states is not None:
        raise AtlasError("attribution takes a fixed baseline or reference weights, not both")
    base = baseline.detach().float().flatten().to(device) if baseline is not None else None
    if base is not None and base.numel() != sae.cfg.d_sae:
        raise AtlasError(f"attribution baseline has {base.numel()} values; the SAE has {sae.cfg.d_sae} latents")
    alphas = [1.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]

    def splice(module: nn.Module, args: Any, output: Any) -> Any:
        h = hidden_from_output(output)
        x = h.detach().float()
        f = sae_dev.encode(x)
        if slot.get("reference_pass"):  # the reference model's latents on these tokens: kept, output untouched
            slot["reference"] = f
            return None
        error = x - sae_dev.decode(f, x)  # kept whole at every point of the path
        alpha = slot["alpha"]
        start = (slot["reference"] if reference_states is not None else
                 torch.zeros_like(f) if base is None else base.expand_as(f))
        # at alpha 1 the path's end is f itself (not start + (f - start), which rounds), so the forward value is
        # exactly h; gradient reaches the model only through the latents
        f_path = (f.clone() if alpha == 1.0 else start + alpha * (f - start)).requires_grad_(True)
        slot["f"], slot["f_full"] = f_path, f - start
        return replace_hidden(output, (sae_dev.decode(f_path, x) + error).to(h.dtype))

    use_pos = accepts_position_ids(lm.model)
    handle = block.register_forward_hook(splice, prepend=True)
    bar = tqdm(total=len(ids), desc="sae attribution", unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        for batch in length_buckets([len(x) for x in ids], batch_size):
            enc = left_pad([ids[i] for i in batch], tok.pad_token_id)
            if not use_pos:
                enc.pop("position_ids")
            mask = enc["attention_mask"].to(device)
            if reference_states is not None:
                slot["reference_pass"] = True
                try:
                    with torch.no_grad(), restored_blocks(lm.model, reference_states, range(layer + 1)):
                        lm.model(**{k: v.to(device) for k, v in enc.items()}, use_cache=False)
                finally:
                    slot["reference_pass"] = False
            grad_sum: Tensor | None = None
            for alpha in alphas:
                slot["alpha"] = alpha
                with torch.enable_grad():
                    logits = lm.model(**{k: v.to(device) for k, v in enc.items()}, use_cache=False).logits[:, -1]
                    score = _logodds(logits, target.to(device)).sum()
                    (grad,) = torch.autograd.grad(score, slot.pop("f"))
                grad_sum = grad if grad_sum is None else grad_sum + grad
            assert grad_sum is not None
            f_full = slot.pop("f_full")
            per_token = grad_sum / len(alphas) * f_full * mask.unsqueeze(-1)
            contrib = (per_token[:, -last:] if last > 0 else per_token).sum(1).float().cpu()
            out[torch.as_tensor(batch)] = contrib
            bar.update(len(batch))
    finally:
        handle.remove()
        bar.close()
        sae.to("cpu")
    return out


def candidates(sae: SparseAutoencoder, direction: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(latent ids, decoder cosines) of the `n` latents whose decoder rows point most along the direction."""
    r = direction.detach().float().flatten()
    r = r / r.norm().clamp_min(1e-12)
    cos = sae.unit_decoder() @ r
    top = torch.topk(cos, min(n, cos.numel()))
    return top.indices, top.values


def candidate_pool(sae: SparseAutoencoder, direction: Tensor, n: int,
                   refusal_direction: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(latent ids, decoder cosines to `direction`): the top `n` by cosine to the node's direction, then
    those of the top `n` by cosine to `refusal_direction` not already in (none when it is None)."""
    cand, _ = candidates(sae, direction, n)
    if refusal_direction is not None:
        extra, _ = candidates(sae, refusal_direction, n)
        seen = set(cand.tolist())
        cand = torch.cat([cand, torch.as_tensor([i for i in extra.tolist() if i not in seen], dtype=torch.long)])
    r = direction.detach().float().flatten()
    return cand, sae.unit_decoder()[cand] @ (r / r.norm().clamp_min(1e-12))


def select(attr: Tensor, cand: Tensor, k: int) -> Tensor:
    """The `k` candidates with the largest mean attribution (rows of `attr` = prompts)."""
    score = attr[:, cand].mean(0)
    return cand[torch.argsort(score, descending=True, stable=True)[: min(k, cand.numel())]]


@torch.no_grad()
def latent_stats(sae: SparseAutoencoder, tokens: TokenActivations, features: Sequence[int],
                 n_contexts: int = 5, chunk: int = 4096) -> tuple[Tensor, list[list[int]]]:
    """(per-prompt mean activation [n_prompts, len(features)], each feature's top rows by activation)."""
    feats = torch.as_tensor(list(features), dtype=torch.long)
    n_prompts = len(tokens.token_ids)
    sums = torch.zeros(n_prompts, len(feats), dtype=torch.float64)
    counts = torch.bincount(tokens.prompt_index, minlength=n_prompts).clamp_min(1).double()
    best_val = torch.full((n_contexts, len(feats)), -torch.inf)
    best_row = torch.full((n_contexts, len(feats)), -1, dtype=torch.long)
    for start in range(0, tokens.acts.shape[0], chunk):
        f = sae.encode(tokens.acts[start:start + chunk])[:, feats]
        sums.index_add_(0, tokens.prompt_index[start:start + chunk], f.double())
        rows = torch.arange(start, start + f.shape[0]).unsqueeze(1).expand_as(f)
        vals = torch.cat([best_val, f])
        idx = torch.cat([best_row, rows])
        top = torch.topk(vals, min(n_contexts, vals.shape[0]), dim=0)
        best_val, best_row = top.values, idx.gather(0, top.indices)
    tops = [[int(r) for r, v in zip(best_row[:, j], best_val[:, j], strict=True) if v > 0] for j in range(len(feats))]
    return (sums / counts.unsqueeze(1)).float(), tops


def _mean(x: Tensor) -> float:
    return float(x.mean()) if x.numel() else float("nan")


def feature_table(
    lm: LoadedModel,
    sae: SparseAutoencoder,
    node: str,
    chosen: Tensor,
    cand: Tensor,
    cos: Tensor,
    attr: Tensor,
    mean_acts: Tensor,
    node_prompts: Tensor,
    harmless_prompts: Tensor,
    tops: list[list[int]],
    tokens: TokenActivations,
    feature_order: Sequence[int],
    n_promoted: int = 8,
) -> pd.DataFrame:
    """One row per selected latent of a node, with the evidence the report and the atlas show."""

    decode = lm.tokenizer.decode
    position = {int(f): i for i, f in enumerate(feature_order)}
    cos_of = {int(c): float(v) for c, v in zip(cand, cos, strict=True)}
    rows = []
    for rank, feat in enumerate(chosen.tolist()):
        j = position[feat]
        lens = promoted_tokens(lm, sae.W_dec[feat].detach(), k=n_promoted)
        rows.append({
            "node": node,
            "rank": rank + 1,
            "feature": int(feat),
            "decoder_cosine": cos_of[int(feat)],
            "attribution": float(attr[:, feat].mean()),
            "attribution_se": float(attr[:, feat].std() / max(attr.shape[0], 1) ** 0.5) if attr.shape[0] > 1 else 0.0,
            "mean_act_node": _mean(mean_acts[node_prompts, j]),
            "mean_act_harmless": _mean(mean_acts[harmless_prompts, j]),
            "top_contexts": [tokens.context(r, 12, 4, decode) for r in tops[j]],
            "promoted_tokens": lens[lens["sign"] == "promoted"]["token"].tolist(),
        })
    return pd.DataFrame(rows)
