"""Run configuration: one dataclass, fields grouped by role prefix, validated when built.

Every field but ``method`` carries its role's prefix: ``model_*`` (teacher, dtypes, LoRA), ``student_*`` (the
generator), ``dm_*`` (distribution matching), ``fake_score_*``, ``disc_*`` (the GAN), ``optim_*``, ``rl_*`` (Stage
2), ``data_*``, ``eval_*`` and ``run_*`` (batch, length, seed, logging, checkpoints). Every field's help text says
where its default comes from (the paper, DMD2's code, or our choice where the sources are silent).

How a value is resolved, later wins:

1. the field's default;
2. the method's default (:data:`METHOD_DEFAULTS`) for the fields whose value is the method's -- ``method: dmd2``
   is DMD2's TTUR 5, latent GAN with its loss and weights, and no EMA pull; ``method: flashdmd`` the paper's
   values -- applied to such a field only where no source below sets it (or sets it to null);
3. the YAML file (``--config``; presets in configs/ say only what differs from 1 and 2);
4. ``--set key=value``, in order.

The resolved config is printed and saved as ``config.yaml`` in the run folder (every value explicit, so that the
file resolves to itself whatever the defaults become). Fields renamed to carry their prefix (:data:`RENAMED`)
keep working under their old names for one release -- in YAML, ``--set``, as keyword or attribute -- with a
one-time warning naming the new name.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flashdmd import FlashDMDError
from flashdmd.choices import QUANTS, ZERO_T5_MODES, family_names
from flashdmd.training.config_parse import coerce_all, load_yaml


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _m(help: str):
    """A field whose default is the method's (METHOD_DEFAULTS); null until the config is built."""
    return field(default=None, metadata={"help": help, "method_default": True})


METHODS = ("flashdmd", "dmd2")
# The fields whose value is the method's (a null field takes it): Flash-DMD's from the paper (TTUR 1, pixel GAN with
# hinge loss) and our choices where it is silent (EMA pull 0.95, GAN weights); DMD2's from its code
# (dfake_gen_update_ratio 5, no EMA pull, the classifier on the fake score's bottleneck with softplus losses,
# gen_cls_loss_weight 5e-3 and guidance_cls_loss_weight 1e-2 of its SDXL scripts).
METHOD_DEFAULTS = {
    "flashdmd": {"fake_score_ttur": 1, "fake_score_ema": 0.95, "disc_kind": "pixel", "disc_loss": "hinge",
                 "disc_gen_weight": 0.05, "disc_weight": 1.0},
    "dmd2": {"fake_score_ttur": 5, "fake_score_ema": 0.0, "disc_kind": "latent", "disc_loss": "ns",
             "disc_gen_weight": 5e-3, "disc_weight": 1e-2},
}
# old name -> new name (the role prefix); the old names work until the next release, with a one-time warning
RENAMED = {"generator_lr": "student_lr", "batch_size": "run_batch_size", "max_steps": "run_max_steps",
           "seed": "run_seed", "log_every_steps": "run_log_every_steps", "sample_every_steps": "run_sample_every_steps",
           "report_to": "run_report_to", "wandb_project": "run_wandb_project",
           "checkpoint_every_steps": "run_checkpoint_every_steps", "checkpoint_keep_last": "run_checkpoint_keep_last",
           "max_nonfinite_in_row": "run_max_nonfinite_in_row"}
# how `flashdmd config-help` says a value is resolved (the module docstring in full)
RESOLUTION = ("A value is resolved in this order, later wins: the field's default; the method's default (fields marked "
              "[null: the method's default], where no source below sets them); the YAML file (--config); --set "
              "key=value, in order. Renamed fields keep working under their old names for one release, with a "
              "warning: " + ", ".join(f"{old} -> {new}" for old, new in RENAMED.items()) + ".")
FROZEN_DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")
OFFLOADS = ("none", "frozen", "base")
COMPILES = ("none", "student", "all")
QUANT_FIELDS = ("model_frozen_quant", "model_text_encoder_quant", "disc_backbone_quant", "rl_reward_quant")


@dataclass
class DistillConfig:
    # ---- what is distilled --------------------------------------------------------------------------
    method: str = _f("flashdmd", "flashdmd (timestep-aware DM/GAN split, Pixel-GAN, EMA-pulled fake score) "
                     "or dmd2 (DM + latent GAN summed at every step, TTUR 5, no EMA pull). Sets the default of every "
                     "field marked [null: the method's default] that the config does not set")
    model_teacher: str = _f("world-sdxl", "teacher: local diffusers pipeline folder, hub id (fetched by "
                            "huggingface_hub into its cache when HF_HUB_OFFLINE=0; offline it must be cached "
                            "already), or a plug-in's model name (world-sdxl / world-sd3)")
    model_family: str | None = _f(None, "a registered model family (sdxl, sd3, flux: flashdmd.families.FAMILIES); "
                                  "default: detected from model_index.json")
    model_lora_rank: int = _f(0, "0 = full fine-tune of student and fake score; >0 = LoRA of this rank (peft) "
                              "on the attention projections of both (SD3 in the paper is trained as a LoRA)")
    model_lora_alpha: float | None = _f(None, "LoRA alpha; default = rank")
    model_shared_base: bool = _f(True, "LoRA only: teacher, student and fake score share ONE copy of the frozen base "
                                 "weights (the student and the fake score are two sets of adapters around it; the "
                                 "Stage-2 reference shares it too). false = a full copy per role, as DMD2's LoRA code "
                                 "does: same results, 2-3x the base's memory. Ignored for full fine-tunes")
    model_gradient_checkpointing: bool = _f(False, "gradient checkpointing: the student's and the fake score's blocks, "
                                            "and on the generator's low-noise branch the VAE decoder's blocks and the "
                                            "Pixel-GAN backbone's layers (the largest activations of a Flash-DMD step "
                                            "at 1024 px); same gradients, less memory, about one more forward of "
                                            "each. Off by default (the embedded world is tiny); on in the real-"
                                            "checkpoint presets")
    model_mixed_precision: str = _f("no", "no | bf16: torch.autocast to bfloat16 around every training step (Stage 1 "
                                    "and Stage 2) and the prepared roles' forwards (through accelerate), on GPU and "
                                    "on CPU alike, so that a CPU run takes the path a GPU run takes; weights, "
                                    "gradients and optimiser states stay in model_dtype. Not with model_frozen_dtype "
                                    "float16 (autocast mixes only float32 and bfloat16)")
    model_dtype: str = _f("float32", "dtype of the trainable weights (student and fake score, or their LoRA adapters; "
                          "discriminator heads, DMD2's latent head), of every optimiser state and of the latents and "
                          "losses: float32, or float64 (exact numerical checks, e.g. tests/test_distributed.py "
                          "comparing 1 and 2 processes)")
    model_frozen_dtype: str = _f("auto", "dtype of the frozen parts: the teacher (under LoRA with model_shared_base: "
                                 "the base the student and fake score share), text encoders, VAE, Pixel-GAN "
                                 "backbone, Stage-2 reward model and the Stage-2 reference's frozen base: auto, "
                                 "float32, float64, bfloat16 or float16. auto (our choice) = bfloat16 when the run's "
                                 "device is CUDA and model_dtype is float32 (half the frozen memory; SDXL / SD3 ship "
                                 "half-precision weights), else model_dtype (CPU runs and the embedded demo: every "
                                 "part in model_dtype, as before). A full fine-tune's student and fake score start "
                                 "from the folder's weights loaded in model_dtype, not from the lower-precision "
                                 "teacher; its Stage-2 reference (a copy of the student) stays in model_dtype")
    model_frozen_quant: str = _f("none", "none | int8 | fp8: weight-only quantisation (torchao; peft's LoRA layers "
                                 "wrap its quantised linears, not optimum-quanto's) of the frozen shared base -- the "
                                 "teacher, which the student and fake score share under LoRA -- after loading in "
                                 "model_frozen_dtype, before the adapters: each linear weight as int8 or float8 with "
                                 "one scale per output row (about half / a quarter of bf16 / fp32 bytes); adapters, "
                                 "heads, optimiser states, latents and losses stay in model_dtype. The teacher's score "
                                 "moves by the rounding (int8: half a step, 1/255 of each row's largest |weight|). LoRA "
                                 "only (a full fine-tune trains the weights); not with FSDP2; fp8 needs a GPU with "
                                 "float8 (compute capability 8.9+). "
                                 "Never saved: a resume quantises the teacher folder again, and export fuses into the "
                                 "folder's original weights")
    model_text_encoder_quant: str = _f("none", "none | int8 | fp8: the same for the text encoders")
    model_offload: str = _f("none", "none | frozen | base: where frozen weights wait between their uses (our choice, "
                            "not in the paper). frozen: the text encoders, the VAE, the Pixel-GAN backbone and the "
                            "reward model are held on the CPU and come onto the device at their first use in a phase "
                            "(an encoding, a generator / fake-score / discriminator / RL step, an evaluation), leaving "
                            "at its end. base: that, and the frozen base itself (the teacher, which the student and "
                            "fake score share under LoRA) block by block with diffusers' group offloading, the next "
                            "block prefetched on a side stream on GPU; for a base that does not fit the card at all "
                            "-- every forward then streams it over PCIe, `flashdmd plan` says how many bytes per "
                            "iteration. Adapters, heads and optimiser states stay on the device. base with a shared "
                            "LoRA base needs model_gradient_checkpointing (each block is onloaded again for its "
                            "recomputation in backward; without it, backward would keep every block's weights on the "
                            "device); not with FSDP2 or SDXL's UNet. Same numbers as none")
    model_compile: str = _f("none", "none | student | all: torch.compile (inductor; our choice, not in the paper) of "
                            "the student and the fake score (student), and also the teacher, the VAE, the text "
                            "encoders and the Pixel-GAN backbone (all; not the Stage-2 reward model). Per block -- "
                            "each transformer / UNet block's forward (the units gradient checkpointing wraps), the "
                            "VAE's blocks, a text encoder or backbone whole --, not the whole denoiser: parameter "
                            "names stay unwrapped (checkpoints, export), peft's adapters and hooks keep working, and "
                            "one graph serves every block of a kind. The first iterations compile (minutes at full "
                            "size); same numbers within float round-off. Not with FSDP2, model_offload base, or all "
                            "with model_offload frozen (their hooks move weights inside the blocks)")
    model_embedded_guidance: float = _f(3.5, "guidance-distilled teachers only (FLUX.1-dev: guidance is an input "
                                        "embedding, not a CFG pair): the fixed guidance value the student and the "
                                        "fake score are always given (FluxPipeline's default 3.5); the DM loss gives "
                                        "the teacher dm_guidance_scale instead. Ignored by other families")
    model_zero_t5: str = _f("auto", "SD3 without text_encoder_3 (our choice, not in the paper): the pipeline passes "
                            "256 zero T5 tokens after the CLIP tokens; being alike at every layer they weigh as one "
                            "zero token with + log 256 on its attention logit. counted: that one token (the same "
                            "output up to float round-off; the transformer's context is 78 tokens, not 333 -- "
                            "at 1024 px 6 % fewer tokens, at 512 px 19 %, on the world's 8x8 latents 9x less "
                            "work); padded: the 256 tokens, as the pipeline; auto: counted on the CPU, padded on a "
                            "GPU (the logit bias is an attention mask, which rules out flash attention kernels). "
                            "Ignored with T5 and by other families")
    model_text_cache: bool = _f(False, "encode every prompt the run will use once at start (the training prompts -- "
                                "a prompt file or captions, not a plug-in's generated ones --, the evaluation and "
                                "sample-grid prompts, the real images' captions for DMD2's latent GAN, the null "
                                "prompt), keep the embeddings (CPU memory, model_frozen_dtype) and free the text "
                                "encoders: on SDXL ~0.3 MB and on SD3 ~2.7 MB per prompt in bfloat16, against "
                                "~1.6 GB (SDXL) / ~11 GB with T5 (SD3) of encoders. Embeddings are computed in "
                                "batches of run_batch_size, as training encodes them (the same numbers). Our "
                                "choice; off by default")

    # ---- the student (generator) -----------------------------------------------------------------------
    student_timesteps: list[float] | None = _f(None, "the K student steps in model timesteps; default from the "
                                               "family (SDXL 999,749,499,249; SD3 shifted 1000,900,750,500)")
    student_dm_steps: int | None = _f(None, "flashdmd: how many leading (high-noise) student steps get the DM loss; "
                                      "the rest get the GAN loss. Default K-1 (paper: DM at 999/749/499, GAN at 249)")
    student_ema: float = _f(0.0, "EMA decay of the student's trainable weights, updated after every generator and RL "
                            "update; > 0: evaluations, sample grids, the saved student and the export use the EMA "
                            "weights, training continues on the raw ones. Not in the paper; common in distillation "
                            "codebases. 0 = off (the student is the raw weights)")
    student_backward_simulation: bool = _f(True, "build the student's input at step k by running the student "
                                           "(no grad) from pure noise with fresh re-noising (DMD2 sample_backward)")

    # ---- distribution matching ------------------------------------------------------------------------
    dm_guidance_scale: float = _f(8.0, "teacher CFG in the DM loss, form uncond + w*(cond-uncond). DMD2 SDXL: 8; "
                                  "the paper does not state its value")
    dm_t_min: float = _f(0.02, "lower end of the DM-loss noise level, as a fraction of the range (DMD2: 0.02)")
    dm_t_max: float = _f(0.98, "upper end of the DM-loss noise level, inclusive as in DMD2's randint(min_step, "
                              "max_step + 1): 0.02..0.98 draws integer timesteps 20..980 on a 1000-step VP schedule")
    dm_t_shifted: bool = _f(True, "flow teachers only: draw the DM-loss sigma as the teacher's shift applied to "
                            "U[dm_t_min, dm_t_max] (its training distribution; with SD3's shift 3, 76 % of draws lie "
                            "above sigma 0.5), or false: sigma uniform in [dm_t_min, dm_t_max] (FastGen's draw for "
                            "its flow teachers). No effect on VP teachers")
    dm_weight: float = _f(1.0, "weight of the DM loss in the generator objective")

    # ---- fake score -------------------------------------------------------------------------------------
    fake_score_ttur: int | None = _m("fake-score (and discriminator) updates per generator update. Flash-DMD: 1-2; "
                                     "DMD2: 5")
    fake_score_ema: float | None = _m("EMA pull after each generator step: fake <- lam*fake + (1-lam)*student. "
                                      "0 disables (DMD2). Value not stated in the paper; 0.95 as a third-party port "
                                      "used; our choice")
    fake_score_target: str = _f("native", "diffusion-loss target: native (eps for eps-UNets as in DMD2, flow "
                                "velocity for flow models) or x0 (the Algorithm-1 transcription)")
    fake_score_lr: float = _f(1e-4, "fake-score learning rate (DMD2 SDXL full fine-tune: 5e-7 at batch 128; our "
                              "tiny world uses a larger one)")

    # ---- discriminator ----------------------------------------------------------------------------------
    disc_kind: str | None = _m("pixel (frozen image encoder + heads on VAE-decoded pixels; Flash-DMD), latent "
                               "(DMD2's classifier on the fake score's bottleneck), or none")
    disc_backbone: str = _f("world", "pixel backbone: sam (transformers SamVisionModel from disc_backbone_path) or "
                            "a plug-in's frozen encoder (world: the embedded world's)")
    disc_backbone_quant: str = _f("none", "none | int8 | fp8: the Pixel-GAN backbone's linear weights, as "
                                  "model_frozen_quant")
    disc_backbone_path: str | None = _f(None, "local folder of the backbone (required for sam)")
    disc_loss: str | None = _m("hinge (Algorithm 1, ADM) or ns (non-saturating, Eq. 10 / DMD2)")
    disc_gen_weight: float | None = _m("weight of the generator's GAN loss (lambda; not stated in the paper; DMD2 "
                                       "latent GAN: 5e-3)")
    disc_weight: float | None = _m("weight of the discriminator loss (DMD2 latent GAN: 1e-2, added to the fake-score "
                                   "loss)")
    disc_lr: float = _f(1e-4, "discriminator-head learning rate")
    disc_head_channels: int = _f(64, "hidden channels of each pixel-discriminator head (pooled: the MLP's width)")
    disc_head: str = _f("patch", "pixel-discriminator heads: patch (the paper's, as far as stated: a conv head per "
                        "encoder level giving patch logits, ADM design) or pooled (not in the paper: one MLP on "
                        "every level's globally pooled features, standardised per channel by statistics of "
                        "disc_calibration_images real images; on the embedded world it separates held-out real "
                        "from student images 79% after 300 updates where patch heads reach 64%, "
                        "benchmarks/disc_probe.py; with disc_head_channels 256, disc_lr 1e-3 and TTUR 2 it is the "
                        "world presets' head since issue 16: faster than patch heads on both world teachers, "
                        "BENCHMARKS.md section 3). The real-checkpoint presets keep the paper's patch heads on SAM, "
                        "where the pooled head is untested")
    disc_condition: str = _f("none", "what the Pixel-GAN judges besides the image (the paper does not say): none "
                             "(unconditional, as far as stated) or text (pooled heads only: a projection head on the "
                             "family's pooled text embedding, zero-initialised, so it starts unconditional -- real "
                             "images are judged with their own captions, which data_real must have, the student's "
                             "with its prompts; DMD2's latent GAN is text-conditioned through the fake score)")
    disc_calibration_images: int = _f(256, "pooled heads: real images (evenly spaced through data_real, the same on "
                                      "every process) whose pooled features fix the heads' standardisation")
    disc_stall_band: float = _f(0.2, "Pixel-GAN stall warning: the band around 0 that D(real) - D(fake) (mean logits, "
                                "per logged interval) stays inside when the discriminator is not learning. On the "
                                "world the paper's patch heads stayed within +-0.15 for 450 steps (BENCHMARKS.md "
                                "section 3) while the pooled head at TTUR 2 sits at 0.2-1.2")
    disc_stall_logs: int = _f(10, "warn once when D(real) - D(fake) has stayed inside disc_stall_band for this many "
                              "logged intervals in a row (log_every_steps apart); 0: never")

    # ---- generator optimisation -------------------------------------------------------------------------
    student_lr: float = _f(2e-5, "student learning rate (DMD2 SDXL: 5e-7 full / 5e-5 LoRA at batch 128)")
    optim_betas: list[float] = _f([0.0, 0.999], "AdamW betas for all roles (DMD2 code: 0.9, 0.999; beta1 = 0 is "
                                  "common in GAN/DMD ports and is our default)")
    optim_weight_decay: float = _f(0.01, "AdamW weight decay (DMD2: 0.01)")
    optim_warmup_steps: int = _f(0, "linear warm-up of the Stage-1 learning rates as DMD2 counts it: the schedule "
                                 "advances once per iteration and process, also on iterations where TTUR skips the "
                                 "generator, from lr 0 at the first update (DMD2: 500, stepped by accelerate 64 times "
                                 "an iteration on its 64 GPUs, so about 8 iterations). A run resumed on another "
                                 "number of processes keeps advancing by its first launch's count, so its schedule "
                                 "per iteration does not change")
    optim_lr_decay: str = _f("none", "decay of the Stage-1 learning rates after the warm-up: none (DMD2: constant), "
                             "cosine or linear, reaching optim_lr_final x lr at max_steps and staying there (Stage 2's "
                             "distillation runs at the final rate). Counted like the warm-up, per iteration and "
                             "process, over max_steps x fake_score_ttur iterations; a resume with another max_steps "
                             "re-times what is left. Not in the paper; our choice, off by default")
    optim_lr_final: float = _f(0.1, "with optim_lr_decay: the final learning rate as a fraction of each role's lr")
    optim_grad_clip: float = _f(10.0, "max gradient norm per role (DMD2: 10)")

    # ---- Stage 2: joint reinforcement learning -----------------------------------------------------------
    rl_enabled: bool = _f(False, "after max_steps Stage-1 generator steps, run Stage 2: step-level DPO at the "
                          "high-noise student steps, alternating with continued distillation")
    rl_steps: int = _f(200, "Stage-2 RL (DPO) updates")
    rl_reward_model: str = _f("world", "latent reward model folder (flashdmd reward train), or a plug-in's (world: "
                              "the shipped LRM of the embedded world's teacher; it fits only that teacher -- "
                              "for your own teacher, make pairs with `flashdmd reward make-pairs --judge ...` "
                              "and train one, docs/PAIRS.md), or LPO's released LRM folder for an SDXL teacher "
                              "(unet/, text_encoder*/, state_dict.pt; detected from its contents and scored exactly "
                              "as LPO does, docs/PAIRS.md). Checked before Stage 1 starts")
    rl_reward_quant: str = _f("none", "none | int8 | fp8: the Stage-2 latent reward model's linear weights "
                              "(rl_reward_model; not an rl_judge), as model_frozen_quant")
    rl_judge: str | None = _f(None, "Stage 2 without a latent reward model: rank the K candidates with a preference "
                              "model on decoded images -- pickscore, hpsv2, imagereward or clip, from the local "
                              "folder rl_judge_model (for a teacher that has no LRM; rl_reward_model is then unused). "
                              "Dearer than an LRM: each candidate is turned into an image (rl_judge_image) and "
                              "VAE-decoded every RL update")
    rl_judge_model: str | None = _f(None, "local folder of rl_judge's weights (as `flashdmd reward make-pairs "
                                    "--judge-model` takes)")
    rl_judge_image: str = _f("predict", "how a candidate latent x_t' becomes the image rl_judge scores (the paper "
                             "scores latents and says nothing): predict (the student's x0 prediction at t', one "
                             "forward per candidate) or finish (the student's remaining steps from t', the image it "
                             "would output; one forward per remaining step)")
    rl_lpo_feature_cfg: float = _f(7.5, "LPO's LRM only: the feature CFG weight on its mid-block features (LPO's "
                                   "SDXL config: 7.5; <= 1 turns it off, as in LPO)")
    rl_step_indices: list[int] = _f([0, 1], "student steps (indices into student_timesteps) that explore K "
                                    "candidate next latents; paper: 999 and 749 -> [0, 1]. Each needs a next step")
    rl_num_candidates: int = _f(4, "K candidates per noisy latent; best and worst by the LRM form the pair (paper: 4)")
    rl_beta: float = _f(500.0, "DPO beta on per-element log-probabilities (LPO SDXL: 500; not stated in Flash-DMD)")
    rl_ratio_clip: float | None = _f(0.1, "clamp each log-ratio to [log(1-c), log(1+c)] as LPO does; null = plain DPO")
    rl_distill_ratio: int = _f(5, "RL updates per Stage-1 distillation iteration (paper: 5:1); 0 = RL alone "
                               "(no ongoing distillation: the reward-hacking ablation)")
    rl_kl_weight: float = _f(0.0, "anchor RL to the reference (the student frozen at Stage 2's start) by an explicit "
                             "KL penalty: L = L_DPO + rl_kl_weight * rl_beta * KL(p_theta || p_ref), the LCM-step "
                             "policies' KL per latent element at the explored state x_t (so 1 puts it in the units "
                             "of DPO's logit). With rl_distill_ratio 0 this is the usual alternative regulariser "
                             "to ongoing distillation (DPOK-style); not in the paper; 0 = off")
    rl_from_ema: bool = _f(True, "with student_ema > 0: Stage 2 starts from the Stage-1 student that was evaluated "
                           "and saved, the EMA weights (copied into the trained ones; the DPO reference is that "
                           "student too). false: from the raw weights -- the EMA then hands over to them within "
                           "~1/(1 - student_ema) updates, so Stage 2's evaluations measure the raw student, not "
                           "Stage 1's (on the demo that alone raised FD by up to 12 %, BENCHMARKS.md section 4). "
                           "The paper is silent (it does not say whether it keeps a generator EMA)")
    rl_lr: float | None = _f(None, "student learning rate for RL updates (own AdamW state); default student_lr")
    rl_guard_tolerance: float = _f(0.1, "warn of reward hacking when the LRM score rises while the held-out oracle "
                                   "falls, or FD rises / diversity falls by more than this fraction vs Stage-2 start")

    # ---- data -------------------------------------------------------------------------------------------
    data_real: str = _f("world", "real images for the GAN: a folder of images (recursive; captions from "
                        "metadata.jsonl with file_name/text, the datasets imagefolder convention), a folder written "
                        "by datasets' save_to_disk, WebDataset .tar shards (a folder of them, one .tar or a brace "
                        "pattern), or a plug-in's (world: Fashion-MNIST train split). Any size or aspect: resized "
                        "(short side) and cropped to data_resolution; read lazily by data_workers")
    data_prompts: str = _f("world", "training prompts: a UTF-8 text file (one per line), captions (the captions "
                           "of data_real), or a plug-in's (world: class templates)")
    data_resolution: int | None = _f(None, "training image side in pixels (real images are resized and cropped to "
                                     "it; the student is trained and sampled at it); default: the teacher's own "
                                     "(denoiser sample_size x VAE factor; `flashdmd info` prints it)")
    data_crop: str = _f("center", "crop after resizing the short side: center, or random (a fresh crop per read, "
                        "seeded by the sample's position, so resume and the process split do not change it)")
    data_workers: int | None = _f(None, "DataLoader worker processes reading real images; 0 = the main process; "
                                  "default: 2 for files, 0 for a plug-in's in-memory images")
    data_max_bad_fraction: float = _f(0.01, "unreadable real images are skipped and counted; above this share of "
                                      "reads (after 64 reads) the run stops with an error naming one of them")

    # ---- evaluation -------------------------------------------------------------------------------------
    eval_every_steps: int = _f(100, "held-out metrics of the K-step student every N generator steps (0 = never): "
                               "the backends below on eval_prompts, or a plug-in teacher's own metrics (world: "
                               "FD, alignment, diversity, oracle); metrics.json evals, tensorboard eval/*")
    eval_num_images: int = _f(500, "images per evaluation (prompt i = line i mod the lines of eval_prompts)")
    eval_prompts: str | None = _f(None, "held-out prompts (UTF-8 text file, one per line) for the evaluations and "
                                  "the sample grids; required for metrics of a teacher that is not a plug-in's")
    eval_clip_model: str | None = _f(None, "local transformers CLIPModel folder: CLIP score (clip_score, higher "
                                     "is better)")
    eval_pickscore_model: str | None = _f(None, "local PickScore_v1 folder (CLIPModel + processor): pickscore")
    eval_hpsv2_model: str | None = _f(None, "local HPSv2 CLIPModel folder: hpsv2")
    eval_imagereward_model: str | None = _f(None, "local ImageReward folder (BLIP + mlp_head.safetensors): "
                                            "imagereward")
    eval_fid_inception: str | None = _f(None, "pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth "
                                        "or .safetensors): fid against eval_fid_ref (lower is better)")
    eval_fid_ref: str | None = _f(None, "FID reference: statistics file (.npz pytorch-fid / .safetensors from "
                                  "`flashdmd eval-stats`) or a folder of real images")
    eval_batch_size: int = _f(16, "sampling batch size of evaluations (images do not depend on it)")
    eval_split: str | None = _f(None, "a plug-in evaluator's prompt split for the evaluations (the embedded world: "
                                "test, its held-out templates, the default and what BENCHMARKS.md reports; val, the "
                                "training templates, to choose a checkpoint without looking at test); not with "
                                "eval_prompts, whose file is the split")
    eval_keep_students: str = _f("none", "none | improved | all: at an evaluation also write the evaluated student "
                                 "(its EMA where student_ema is set) as a run folder OUT/students/step_N (run.json + "
                                 "student/, which flashdmd eval / sample / export take): all = every evaluation, "
                                 "improved = when eval_select_metric is the best so far, which keeps the best "
                                 "student up to any step; for choosing a checkpoint afterwards")
    eval_select_metric: str = _f("fd", "the metric eval_keep_students: improved follows (its direction from the "
                                 "evaluator: fd / fid lower, the scores higher is better)")

    # ---- run control ------------------------------------------------------------------------------------
    run_batch_size: int = _f(32, "images per generator update (per process); a resume on another number of "
                             "processes needs the same global batch (run_batch_size x processes)")
    run_max_steps: int = _f(400, "generator updates")
    run_seed: int = _f(0, "seed; each process adds its rank")
    run_log_every_steps: int = _f(10, "tensorboard scalars every N generator steps")
    run_sample_every_steps: int = _f(100, "image grid every N generator steps (0 = never)")
    run_report_to: list[str] = _f(["tensorboard"], "trackers for training scalars: tensorboard (DIR/tb) and/or wandb "
                                  "(through accelerate's WandBTracker; needs `pip install wandb`, off by default)")
    run_wandb_project: str = _f("flashdmd", "wandb project when run_report_to has wandb (run name: the run folder's "
                                "name)")
    run_checkpoint_every_steps: int = _f(200, "full checkpoint (every role, optimiser, RNG, counter) every N student "
                                         "updates; 0 = only the final student")
    run_checkpoint_keep_last: int = _f(3, "checkpoints kept (older ones deleted after a newer one is complete)")
    run_max_nonfinite_in_row: int = _f(5, "a NaN/Inf loss or gradient skips that update with a warning; after this "
                                       "many in a row for one role the run stops")

    # -------------------------------------------------------------------------------------------------
    def __post_init__(self):
        for name, value in METHOD_DEFAULTS.get(self.method, {}).items():  # what no source set is the method's
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    def __getattr__(self, name: str):
        """An old field name (RENAMED) reads the new field, with a one-time warning."""
        if name in RENAMED:
            return getattr(self, _renamed(name))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def validate(self):
        """Every field's own range, then the combinations; one FlashDMDError line naming the field."""
        self._validate_model()
        self._validate_losses()
        self._validate_disc()
        self._validate_optim_and_run()
        self._validate_rl()

    def _validate_model(self):
        _need(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        _need(self.model_family is None or self.model_family in family_names(),
              f"model_family must be one of {', '.join(sorted(family_names()))} or null, got {self.model_family!r}")
        _need(self.model_lora_rank >= 0, "model_lora_rank must be >= 0")
        _need(self.model_mixed_precision in ("no", "bf16"), "model_mixed_precision must be 'no' or 'bf16'")
        _need(self.model_dtype in ("float32", "float64"), "model_dtype must be float32 or float64")
        _need(self.model_frozen_dtype in FROZEN_DTYPES,
              f"model_frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, got {self.model_frozen_dtype!r}")
        for name in QUANT_FIELDS:
            value = getattr(self, name)
            _need(value in QUANTS, f"{name} must be one of {', '.join(QUANTS)}, got {value!r}")
        _need(self.model_frozen_quant == "none" or self.model_lora_rank > 0,
              "model_frozen_quant quantises frozen weights, and a full fine-tune (model_lora_rank 0) trains the "
              "student's: set model_lora_rank > 0, or model_frozen_quant none")
        _need(self.model_offload in OFFLOADS, f"model_offload must be one of {', '.join(OFFLOADS)}, "
              f"got {self.model_offload!r}")
        _need(self.model_offload != "base" or self.model_gradient_checkpointing or self.model_lora_rank == 0
              or not self.model_shared_base, "model_offload base streams the shared base's blocks, and without "
              "gradient checkpointing the student's and fake score's backward keeps every block's weights on the "
              "device: set model_gradient_checkpointing true")
        _need(self.model_compile in COMPILES, f"model_compile must be one of {', '.join(COMPILES)}, "
              f"got {self.model_compile!r}")
        _need(self.model_zero_t5 in ZERO_T5_MODES, f"model_zero_t5 must be one of {', '.join(ZERO_T5_MODES)}, "
              f"got {self.model_zero_t5!r}")
        _need(self.model_compile == "none" or self.model_offload != "base", "model_compile with model_offload base: "
              "the streamed blocks' hooks move weights inside the compiled blocks; set one of them to none")
        _need(self.model_compile != "all" or self.model_offload == "none", "model_compile all with model_offload "
              "frozen: the frozen parts' hooks move weights inside their compiled forwards; set model_compile student")
        _need(not (self.model_mixed_precision == "bf16" and self.model_frozen_dtype == "float16"),
              "model_mixed_precision bf16 autocasts to bfloat16, which cannot run float16 frozen weights (torch's "
              "autocast promotes only float32 and bfloat16 tensors): set model_frozen_dtype bfloat16 (or auto), or "
              "model_mixed_precision no")

    def _validate_losses(self):
        _need(self.student_timesteps is None or len(self.student_timesteps) >= 1, "student_timesteps must not be empty")
        if self.student_timesteps is not None:
            ts = list(self.student_timesteps)
            _need(all(a > b for a, b in zip(ts, ts[1:])), f"student_timesteps must be strictly decreasing, got {ts}")
        _need(self.student_dm_steps is None or self.student_dm_steps >= 1, "student_dm_steps must be >= 1")
        _need(0.0 <= self.dm_t_min < self.dm_t_max <= 1.0, "need 0 <= dm_t_min < dm_t_max <= 1")
        _need(self.dm_guidance_scale >= 0, "dm_guidance_scale must be >= 0")
        _need(self.fake_score_ttur >= 1, "fake_score_ttur must be >= 1")
        _need(0.0 <= self.fake_score_ema < 1.0, "fake_score_ema must be in [0, 1)")
        _need(0.0 <= self.student_ema < 1.0, "student_ema must be in [0, 1)")
        _need(self.fake_score_target in ("native", "x0"), "fake_score_target must be native or x0")

    def _validate_disc(self):
        _need(self.disc_kind in ("pixel", "latent", "none"), "disc_kind must be pixel, latent or none")
        _need(self.disc_loss in ("hinge", "ns"), "disc_loss must be hinge or ns")
        _need(self.disc_head in ("patch", "pooled"), "disc_head must be patch or pooled")
        _need(self.disc_condition in ("none", "text"), "disc_condition must be none or text")
        _need(self.disc_condition == "none" or (self.disc_kind == "pixel" and self.disc_head == "pooled"),
              "disc_condition: text needs disc_kind: pixel and disc_head: pooled")
        _need(self.disc_calibration_images >= 2, "disc_calibration_images must be >= 2")
        _need(self.disc_stall_band >= 0 and self.disc_stall_logs >= 0,
              "disc_stall_band and disc_stall_logs must be >= 0")
        _need(not (self.disc_backbone == "sam" and self.disc_kind == "pixel" and not self.disc_backbone_path),
              "disc_backbone sam needs disc_backbone_path: a local SAM folder (e.g. facebook/sam-vit-base)")

    def _validate_optim_and_run(self):
        _need(self.optim_lr_decay in ("none", "cosine", "linear"), "optim_lr_decay must be none, cosine or linear")
        _need(0.0 <= self.optim_lr_final <= 1.0, "optim_lr_final must be in [0, 1]")
        _need(len(self.optim_betas) == 2 and all(0 <= b < 1 for b in self.optim_betas),
              "optim_betas: two numbers in [0, 1)")
        for name in ("fake_score_lr", "disc_lr", "student_lr"):
            _need(getattr(self, name) > 0, f"{name} must be > 0")
        for name in ("run_batch_size", "run_max_steps", "run_log_every_steps", "run_checkpoint_keep_last",
                     "run_max_nonfinite_in_row", "eval_batch_size"):
            _need(getattr(self, name) >= 1, f"{name} must be >= 1")
        for name in ("run_sample_every_steps", "eval_every_steps", "run_checkpoint_every_steps", "optim_warmup_steps"):
            _need(getattr(self, name) >= 0, f"{name} must be >= 0")
        _need(self.eval_num_images >= 2, "eval_num_images must be >= 2")
        _need(self.eval_keep_students in ("none", "improved", "all"), "eval_keep_students must be none, improved or all")
        _need(self.eval_split is None or self.eval_prompts is None,
              "eval_split chooses a plug-in's prompt split; with eval_prompts the file is the split (drop one)")
        _need(self.data_resolution is None or self.data_resolution >= 8, "data_resolution must be >= 8 pixels or null")
        _need(self.data_crop in ("center", "random"), "data_crop must be center or random")
        _need(self.data_workers is None or self.data_workers >= 0, "data_workers must be >= 0 or null")
        _need(0.0 <= self.data_max_bad_fraction < 1.0, "data_max_bad_fraction must be in [0, 1)")
        _need(len(self.run_report_to) >= 1 and set(self.run_report_to) <= {"tensorboard", "wandb"},
              f"run_report_to: a list of tensorboard and/or wandb, got {self.run_report_to}")

    def _validate_rl(self):
        _need(self.rl_steps >= 0, "rl_steps must be >= 0")
        _need(self.rl_judge is None or self.rl_judge in ("pickscore", "hpsv2", "imagereward", "clip"),
              "rl_judge must be pickscore, hpsv2, imagereward or clip (or unset: the LRM in rl_reward_model)")
        _need((self.rl_judge is None) == (self.rl_judge_model is None),
              "rl_judge and rl_judge_model go together: the judge's name and its local folder")
        _need(self.rl_judge_image in ("predict", "finish"), "rl_judge_image must be predict or finish")
        _need(self.rl_num_candidates >= 2, "rl_num_candidates must be >= 2 (a best and a worst)")
        _need(self.rl_beta > 0, "rl_beta must be > 0")
        _need(self.rl_ratio_clip is None or 0 < self.rl_ratio_clip < 1, "rl_ratio_clip must be in (0, 1) or null")
        _need(self.rl_distill_ratio >= 0, "rl_distill_ratio must be >= 0")
        _need(self.rl_lr is None or self.rl_lr > 0, "rl_lr must be > 0")
        _need(self.rl_kl_weight >= 0, "rl_kl_weight must be >= 0 (0 = no KL anchor)")
        _need(len(self.rl_step_indices) >= 1 and all(i >= 0 for i in self.rl_step_indices),
              "rl_step_indices: a non-empty list of student-step indices")

    # ---- I/O ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """name -> help text; a method-dependent field's ends with each method's default."""
        return {f.name: f.metadata.get("help", "") + (_method_note(f.name) if f.metadata.get("method_default")
                                                       else "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_sources(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "DistillConfig":
        """Defaults <- the method's defaults <- YAML file <- ``key=value`` overrides (values parsed as YAML
        scalars/lists); see the module docstring."""
        raw: dict = {}
        if path is not None:
            raw.update(_current_names(load_yaml(Path(path)), f"config file {path}"))
        for item in overrides or []:
            if "=" not in item:
                raise FlashDMDError(f"--set {item!r}: expected key=value")
            k, v = item.split("=", 1)
            try:
                value = yaml.safe_load(v)
            except yaml.YAMLError:
                raise FlashDMDError(f"--set {item!r}: value is not valid YAML") from None
            k = _renamed(k.strip()) if k.strip() in RENAMED else k.strip()
            if isinstance(value, bool) and k in _STRING_FIELDS:  # YAML 1.1 reads no / off / yes as booleans
                value = v.strip()
            raw[k] = value
        return cls(**coerce_all(cls, raw, RENAMED))


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise FlashDMDError(f"config: {msg}")


def _method_note(name: str) -> str:
    return " [null: the method's default -- " + ", ".join(f"{m} {d[name]!r}" for m, d in METHOD_DEFAULTS.items()) + "]"


_WARNED: set[str] = set()


def _renamed(old: str) -> str:
    """The new name of the renamed field ``old``; warns once per process that the old name is deprecated."""
    new = RENAMED[old]
    if old not in _WARNED:
        _WARNED.add(old)
        warnings.warn(f"config: {old} is renamed {new}; the old name works until the next release", FutureWarning,
                      stacklevel=3)
    return new


def _current_names(raw: dict, where: str) -> dict:
    """``raw`` with old field names replaced by the new ones; a field set under both names is an error."""
    out = {}
    for k, v in raw.items():
        new = _renamed(k) if k in RENAMED else k
        if new in out:
            old = k if k != new else next(o for o, n in RENAMED.items() if n == new)
            raise FlashDMDError(f"{where} sets {new} twice (also as its old name {old}): keep {new}")
        out[new] = v
    return out


def _accept_old_names(init):
    """DistillConfig(...) keyword arguments under old field names (RENAMED) go to the new ones, with the warning."""
    @functools.wraps(init)
    def __init__(self, **kwargs):
        init(self, **_current_names(kwargs, "DistillConfig(...)"))
    return __init__


DistillConfig.__init__ = _accept_old_names(DistillConfig.__init__)
_STRING_FIELDS = {f.name for f in dataclasses.fields(DistillConfig)
                  if str in (typing.get_args(typing.get_type_hints(DistillConfig)[f.name]) or
                             (typing.get_type_hints(DistillConfig)[f.name],))}
