"""The ONE compiled training step: Sigma-VAE forward, generator update, discriminator update,
EMA, NaN guard. A pure function `(state, images, lpips_vars) -> (state, metrics)`.

The adaptive GAN weight needs |grad_W nll| and |grad_W g| for W = the decoder's conv_out
kernel. Both are weight gradients of a single conv whose input h (the decoder features) and
output cotangents (dnll/dx_hat, dg/dx_hat) the step has anyway, so they cost two small convs,
not extra backward passes through the decoder. The generator backward then runs once, with
the combined cotangent dnll/dx_hat + d_weight * disc_factor * dg/dx_hat.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sigmavae_jax import losses, parallel
from sigmavae_jax.config import Config
from sigmavae_jax.models import layers
from sigmavae_jax.models.params import flatten_params, unflatten_params
from sigmavae_jax.train.state import TrainState, TrainStructure

StepFn = Callable[[TrainState, jax.Array, Any], tuple[TrainState, dict[str, jax.Array]]]


def conv_kernel_grad(conv: nnx.Conv, h: jax.Array, cotangent: jax.Array) -> jax.Array:
    """grad_K <cotangent, conv_K(h)>: the kernel gradient of `conv` at input h, float32,
    computed by the conv's own function (its kernels).

    h: (B, H, W, C_in); cotangent: (B, H', W', C_out); result: conv's kernel shape.
    """
    kernel = jnp.zeros(conv.kernel.shape, jnp.float32)  # the conv is linear in its kernel
    apply = functools.partial(layers.conv_with_kernel, conv, h.astype(jnp.float32))
    _, pullback = jax.vjp(apply, kernel)
    return pullback(cotangent.astype(jnp.float32))[0]


def _partition_params(tree: dict[str, Any], keep: frozenset) -> tuple[dict[str, Any], dict[str, Any]]:
    """Nested params -> (those whose path is in `keep`, the rest), both nested."""
    flat = flatten_params(tree)
    kept = unflatten_params({p: v for p, v in flat.items() if p in keep})
    rest = unflatten_params({p: v for p, v in flat.items() if p not in keep})
    return kept, rest


def _combine_params(*trees: dict[str, Any]) -> dict[str, Any]:
    """Undoes `_partition_params`: one nested tree holding every leaf of `trees`."""
    flat: dict = {}
    for tree in trees:
        flat.update(flatten_params(tree))
    return unflatten_params(flat)


def make_train_step(cfg: Config, modules: TrainStructure, lpips_graph: Any = None) -> StepFn:
    """The pure step for `cfg`. `lpips_graph` is the LPIPS nnx.GraphDef (None when the
    perceptual weight is 0); its variables come in as the step's third argument."""
    loss_cfg = cfg.loss
    if loss_cfg.perceptual_weight > 0 and lpips_graph is None:
        raise ValueError("loss.perceptual_weight > 0 needs the LPIPS network; pass lpips_graph")

    def generator_forward(trained, frozen, x, key):
        vae = nnx.merge(modules.vae, _combine_params(frozen, trained))
        posterior = vae.posterior(x)
        h = vae.decode_features(vae.training_latent(posterior, key))  # (B, H, W, ch)
        x_hat = vae.image_from_features(h)
        return (x_hat, posterior.kl()), (h, posterior.mean)

    def nll_of(x, x_hat, logvar, lpips_vars):
        pixel = losses.pixel_loss(x, x_hat, loss_cfg.pixel_loss)
        perceptual = None
        if loss_cfg.perceptual_weight > 0:
            with jax.named_scope("lpips"):
                perceptual = nnx.merge(lpips_graph, lpips_vars)(x, x_hat, remat=bool(cfg.train.remat))
        rec = losses.reconstruction_loss(pixel, perceptual, loss_cfg.perceptual_weight)
        parts = {
            "loss/pixel": jnp.mean(pixel),
            "loss/lpips": jnp.mean(perceptual) if perceptual is not None else jnp.zeros(()),
            "loss/rec": jnp.mean(rec),
        }
        return losses.nll_loss(rec, logvar), parts

    def disc_apply(disc_params, disc_stats, images):
        disc = nnx.merge(modules.disc, disc_params, disc_stats)
        with jax.named_scope("discriminator"):
            logits = disc(images)
        return logits, nnx.to_pure_dict(nnx.state(disc, nnx.BatchStat))

    def train_step(state: TrainState, images: jax.Array, lpips_vars: Any):
        step = state.step
        key = jax.random.fold_in(state.rng, step)
        x = images.astype(jnp.float32)
        batch = x.shape[0]
        trained, frozen = _partition_params(state.params["vae"], modules.trained_paths)
        logvar = state.params["logvar"]

        # Generator forward, kept for one backward pass with the combined cotangent.
        (x_hat, kl), pullback, (h, latent_mean) = jax.vjp(
            lambda t: generator_forward(t, frozen, x, key), trained, has_aux=True
        )
        (nll, parts), (ct_nll, g_logvar) = jax.value_and_grad(nll_of, argnums=(1, 2), has_aux=True)(
            x, x_hat, logvar, lpips_vars
        )
        kl_value = losses.kl_loss(kl)
        zero = jnp.zeros((), jnp.float32)

        if loss_cfg.uses_gan:
            disc_active = step >= loss_cfg.disc_start
            disc_factor = losses.adopt_weight(loss_cfg.disc_factor, step, loss_cfg.disc_start)
            conv_out = nnx.merge(modules.vae, state.params["vae"]).decoder.conv_out

            def with_gan():
                def g_of(x_hat):
                    logits, _ = disc_apply(state.disc_params, state.disc_stats, x_hat)
                    return losses.generator_adversarial_loss(logits)

                g, ct_g = jax.value_and_grad(g_of)(x_hat)
                if not loss_cfg.adaptive_gan_weight:
                    return g, ct_g, jnp.asarray(loss_cfg.disc_weight, jnp.float32), zero, zero
                nll_grad, g_grad = conv_kernel_grad(conv_out, h, ct_nll), conv_kernel_grad(conv_out, h, ct_g)
                d_weight = losses.adaptive_weight(nll_grad, g_grad, loss_cfg.disc_weight)
                return g, ct_g, d_weight, jnp.linalg.norm(nll_grad), jnp.linalg.norm(g_grad)

            def without_gan():
                return zero, jnp.zeros_like(x_hat), zero, zero, zero

            g_loss, ct_g, d_weight, nll_grad_norm, g_grad_norm = modules.kernels.cond(
                disc_active, with_gan, without_gan
            )
            ct_x_hat = ct_nll + (d_weight * disc_factor) * ct_g
        else:
            g_loss = d_weight = disc_factor = nll_grad_norm = g_grad_norm = zero
            ct_x_hat = ct_nll

        ct_kl = jnp.full_like(kl, loss_cfg.kl_weight / batch)
        (trained_grads,) = pullback((ct_x_hat, ct_kl))
        frozen_grads = jax.tree.map(jnp.zeros_like, frozen)
        gen_grads = {"vae": _combine_params(frozen_grads, trained_grads), "logvar": g_logvar}
        total = nll + d_weight * disc_factor * g_loss + loss_cfg.kl_weight * kl_value

        updates, opt_state = modules.gen_tx.update(gen_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        metrics = {
            "loss": total,
            "loss/nll": nll,
            "loss/kl": kl_value,
            "loss/g": g_loss,
            "d_weight": d_weight,
            "adaptive/nll_grad_norm": nll_grad_norm,  # |grad_W nll|, W = decoder conv_out kernel
            "adaptive/g_grad_norm": g_grad_norm,  # |grad_W g|
            "disc_factor": disc_factor,
            "logvar": logvar,
            "grad_norm": optax.tree.norm(trained_grads),
            "latent/mean_abs": jnp.mean(jnp.abs(latent_mean)),
            **parts,
        }

        disc_params, disc_stats, disc_opt_state = state.disc_params, state.disc_stats, state.disc_opt_state
        if loss_cfg.uses_gan:
            fake = jax.lax.stop_gradient(x_hat)

            def disc_loss_of(disc_params):
                real_logits, stats = disc_apply(disc_params, state.disc_stats, x)
                fake_logits, stats = disc_apply(disc_params, stats, fake)
                loss = disc_factor * losses.discriminator_loss(real_logits, fake_logits, loss_cfg.disc_loss)
                return loss, (stats, jnp.mean(real_logits), jnp.mean(fake_logits))

            def disc_grads():
                return jax.value_and_grad(disc_loss_of, has_aux=True)(state.disc_params)

            def no_disc_grads():
                # Before disc_start the reference still steps Adam with zero gradients.
                zeros = jax.tree.map(jnp.zeros_like, state.disc_params)
                return (zero, (state.disc_stats, zero, zero)), zeros

            (d_loss, (disc_stats, real_mean, fake_mean)), d_grads = modules.kernels.cond(
                disc_active, disc_grads, no_disc_grads
            )
            d_updates, disc_opt_state = modules.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
            disc_params = optax.apply_updates(state.disc_params, d_updates)
            metrics.update(
                {
                    "loss/disc": d_loss,
                    "logits/real": real_mean,
                    "logits/fake": fake_mean,
                    "disc_grad_norm": optax.tree.norm(d_grads),
                }
            )

        ema = state.ema
        if ema is not None:
            ema = optax.incremental_update(params["vae"], ema, 1.0 - cfg.train.ema_decay)

        # NaN guard: a step whose loss or gradients are not finite changes nothing but the
        # step counter (the batch is consumed), and says so in metrics["skipped"].
        finite = jnp.isfinite(total) & jnp.isfinite(metrics["grad_norm"])
        if loss_cfg.uses_gan:
            finite &= jnp.isfinite(metrics["loss/disc"]) & jnp.isfinite(metrics["disc_grad_norm"])
        updated = (params, opt_state, disc_params, disc_stats, disc_opt_state, ema)
        previous = (state.params, state.opt_state, state.disc_params, state.disc_stats, state.disc_opt_state, state.ema)
        params, opt_state, disc_params, disc_stats, disc_opt_state, ema = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), updated, previous
        )
        metrics["skipped"] = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=step + 1,
            params=params,
            opt_state=opt_state,
            disc_params=disc_params,
            disc_stats=disc_stats,
            disc_opt_state=disc_opt_state,
            ema=ema,
        )
        return new_state, metrics

    return train_step


def compile_train_step(step_fn: StepFn, state_sharding: TrainState, mesh: Mesh, lpips_vars: Any):
    """jit with explicit shardings; the state is donated. Returns the jitted step."""
    lpips_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), lpips_vars)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, parallel.batch_sharding(mesh), lpips_sharding),
        out_shardings=(state_sharding, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
