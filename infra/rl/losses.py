"""The objectives of GRPO and DPO on per-token log-probabilities (pure functions, float32).

GRPO (DeepSeekMath; the form TRL and tunix implement): per completion token t of sequence i,

    ratio = exp(logp - old_logp)
    loss_t = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * KL_t
    KL_t = exp(ref_logp - logp) - (ref_logp - logp) - 1      (the k3 estimator, >= 0)

averaged over every completion token of the batch ("token") or per sequence then over
sequences ("sequence"). A_i is the group-relative advantage (`group_advantages`). With one
update per rollout, old_logp is logp itself (stop-gradient): the ratio is 1 and the gradient is
the policy gradient -mean(A_i * grad logp_t).

DPO (Rafailov et al.): with sequence log-probabilities of the chosen / rejected completions under
the policy (pc, pr) and the reference (rc, rr),

    loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STD_EPS = 1e-4  # added to a group's reward std (a group of equal rewards has advantage 0)


def group_advantages(rewards: np.ndarray, group_size: int, scale: bool = True) -> np.ndarray:
    """Each reward minus its group's mean (groups: consecutive `group_size` rewards), divided by
    the group's sample standard deviation (+ `STD_EPS`) when `scale`; float32."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale:
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + STD_EPS)
    return centred.reshape(-1).astype(np.float32)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def grpo_objective(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array,
                   advantages: jax.Array, mask: jax.Array, *, epsilon: float, beta: float,
                   averaging: str = "token") -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) over (batch, length) per-token arrays; `mask` 1 on completion tokens."""
    ratio = jnp.exp(logp - old_logp)
    a = advantages[:, None]
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
    per_token = -jnp.minimum(ratio * a, clipped * a)
    log_ref_ratio = ref_logp - logp
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    if beta:
        per_token = per_token + beta * kl
    if averaging == "token":
        loss = masked_mean(per_token, mask)
    else:
        lengths = jnp.sum(mask, axis=1)
        per_row = jnp.sum(per_token * mask, axis=1) / jnp.maximum(lengths, 1.0)
        loss = masked_mean(per_row, (lengths > 0).astype(per_row.dtype))
    is_clipped = ((ratio < 1.0 - epsilon) & (a < 0)) | ((ratio > 1.0 + epsilon) & (a > 0))
    metrics = {"clip_fraction": masked_mean(is_clipped.astype(jnp.float32), mask)}
    if beta:  # without a penalty there is no reference to compare with
        metrics["kl"] = masked_mean(kl, mask)
    return loss, metrics


def dpo_objective(policy_chosen: jax.Array, policy_rejected: jax.Array,
                  ref_chosen: jax.Array, ref_rejected: jax.Array, *, beta: float,
                  weight: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss, metrics) over pairs of sequence log-probabilities (pairs,) each; `weight`
    (pairs,) 0 for padding pairs."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    w = jnp.ones_like(margin) if weight is None else weight
    return masked_mean(-jax.nn.log_sigmoid(margin), w), {
        "reward_accuracy": masked_mean((margin > 0).astype(jnp.float32), w),
        "reward_margin": masked_mean(margin, w), "reward_chosen": masked_mean(chosen, w),
        "reward_rejected": masked_mean(rejected, w)}
