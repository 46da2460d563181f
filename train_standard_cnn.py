"""Stage 1: train a ResNet-18 classifier on 1-channel sketches.

Usage
-----
    python train_standard_cnn.py                                  # synthetic sketches, ~2 min on 2 EPYC cores (Xeon: 4-7)
    python train_standard_cnn.py --epochs=8                       # what `make demo` runs (~2.5 min on the EPYC, test 0.994)
    python train_standard_cnn.py --dataset=tu-berlin --image_size=224 --epochs=30 --batch_size=128 --lr=3e-3 --pretrained=True
    python train_standard_cnn.py --dataset=folder --data_root=my_sketches
    python train_standard_cnn.py --layer4_stride=2                # torchvision's layer4: 2x2 map at 64 px
    python train_standard_cnn.py --synthetic_fresh=False          # train on the cached sketches every epoch
    python train_standard_cnn.py --resume=True                    # continue from OUT_DIR/last.pt
    python train_standard_cnn.py --overwrite=True                 # replace the earlier run in OUT_DIR
    torchrun --nproc_per_node=4 train_standard_cnn.py --dataset=tu-berlin   # DDP (auto when >1 GPU)

Writes OUT_DIR/best.pt (best validation accuracy, ties to the lower validation loss), last.pt
(every epoch, with optimiser state), label_decoder.json, metrics.json, config.json and
TensorBoard logs in OUT_DIR/tb.
The checkpoint records the dataset spec, preprocessing, split and architecture (with
LAYER4_STRIDE), so later stages never ask for the dataset again and rebuild the same model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from selfexplain import artifacts, data
from selfexplain import classifier_train as ct
from selfexplain.artifacts import TrainState, save_effective_config
from selfexplain.config import make_config, module_constants, require_ranges, run_cli
from selfexplain.distributed import (barrier, cleanup, exit_on_sigterm, keep_freed_memory, main_rank_first,
                                     maybe_launch_torchrun, set_threads, setup_runtime)
from selfexplain.errors import UserError
from selfexplain.model import SketchResNet

# ----------------------------------------------------------------------------- config
DATASET = "synthetic"          # synthetic | tu-berlin | parquet | folder
DATA_ROOT = ""                 # source folder ('' = data/<dataset>); unused for synthetic
SYNTHETIC_PER_CLASS = 600      # synthetic only: images generated per class
SYNTHETIC_STYLE = "varied"     # synthetic only: varied (how people draw: any size, place, pen) | quadrants (2-epoch toy)
SYNTHETIC_FRESH = True         # synthetic only: draw new training sketches every epoch after the first (no memorising)
IMAGE_SIZE = 64                # side of the square input (multiple of 32); 224 for TU-Berlin
LAYER4_STRIDE = 1              # 1: layer4 map H/16 (4x4 at 64 px, 14x14 at 224); 2: H/32 (torchvision's)
CACHE_DIR = artifacts.CACHE_DIR  # decoded uint8 image cache, keyed by source and size
OUT_DIR = artifacts.CLASSIFIER_DIR  # where checkpoints, metrics and logs go
EPOCHS = 6                     # passes over the training split (~2 min on 2 EPYC cores, test 0.990; `make demo` trains 8: 0.994)
BATCH_SIZE = 64                # images per optimiser micro-batch (per process under DDP)
ACCUM_STEPS = 1                # micro-batches per optimiser step (gradient accumulation)
LR = 5e-3                      # peak AdamW learning rate
WEIGHT_DECAY = 0.05            # AdamW weight decay
WARMUP_FRACTION = 0.1          # share of all steps spent warming up linearly, then cosine
LABEL_SMOOTHING = 0.1          # cross-entropy label smoothing
GRAD_CLIP = 1.0                # max gradient norm (0 = off)
VAL_FRACTION = 0.1             # share of each class held out for validation
TEST_FRACTION = 0.1            # share of each class held out for the final test
AUGMENT = "auto"               # batched affine / flip / stroke thickness: auto (off for synthetic) | True | False
PRETRAINED = False             # start from ImageNet weights (needs the download)
AMP = "auto"                   # auto | bf16 | fp16 | off (auto: bf16/fp16 on CUDA, bf16 on CPUs with native bf16)
CHANNELS_LAST = True           # channels_last memory format (faster convs)
DEVICE = "auto"                # auto | cpu | cuda
NUM_THREADS = 0                # CPU intra-op threads (0 = torch default)
MAX_BATCHES = 0                # stop each epoch after this many batches (0 = full epoch)
RESUME = False                 # continue from OUT_DIR/last.pt (same dataset settings required)
OVERWRITE = False              # replace an earlier run in OUT_DIR (without it, or RESUME, an earlier run is refused)
TENSORBOARD = True             # write TensorBoard logs to OUT_DIR/tb
SEED = 0                       # seeds the split, the synthetic set, init and batch order


def build_spec(cfg) -> dict:
    """The dataset spec the settings name (recorded in the checkpoint)."""
    if cfg.DATASET == "synthetic" and cfg.DATA_ROOT:  # the user meant their folder: training synthetic would mislead
        raise UserError(f"DATA_ROOT={cfg.DATA_ROOT} is set but DATASET=synthetic draws its own sketches; add "
                        "--dataset=folder (class-per-folder images) or --dataset=parquet")
    root = cfg.DATA_ROOT or (None if cfg.DATASET == "synthetic" else f"data/{cfg.DATASET}")
    if root:  # absolute: a later stage run from another folder read (or downloaded) another copy
        root = str(Path(root).expanduser().resolve())
    extra = ({"per_class": cfg.SYNTHETIC_PER_CLASS, "seed": cfg.SEED, "style": cfg.SYNTHETIC_STYLE}
             if cfg.DATASET == "synthetic" else {})
    return data.dataset_spec(cfg.DATASET, root, cfg.IMAGE_SIZE, **extra)


def main(**overrides) -> dict:
    cfg = make_config(module_constants(globals()), overrides)
    if cfg.ACCUM_STEPS < 1 or cfg.BATCH_SIZE < 1 or cfg.EPOCHS < 0 or cfg.LR <= 0:
        raise UserError("BATCH_SIZE and ACCUM_STEPS must be >= 1, EPOCHS >= 0 and LR > 0")
    require_ranges(cfg, {"SEED": (0, None), "WEIGHT_DECAY": (0, None), "WARMUP_FRACTION": (0, 1),
                         "LABEL_SMOOTHING": (0, 0.99), "GRAD_CLIP": (0, None), "MAX_BATCHES": (0, None),
                         "NUM_THREADS": (0, None)})
    if not (0 < cfg.VAL_FRACTION and 0 < cfg.TEST_FRACTION and cfg.VAL_FRACTION + cfg.TEST_FRACTION < 1):
        raise UserError(f"need VAL_FRACTION > 0, TEST_FRACTION > 0 and their sum < 1, got {cfg.VAL_FRACTION}, "
                        f"{cfg.TEST_FRACTION} (validation picks best.pt; later stages score on the test split)")
    settings = ct.ClassifierTrainSettings.from_config(cfg, augment=ct.resolve_augment(cfg.AUGMENT, cfg.DATASET))
    spec = build_spec(cfg)
    runtime = setup_runtime(cfg.DEVICE)
    settings.config["WORLD_SIZE"] = runtime.world_size  # fixes the steps per epoch: a resume must match it
    set_threads(cfg.NUM_THREADS)
    torch.manual_seed(cfg.SEED + runtime.rank)
    out_dir = dict(resume=cfg.RESUME, overwrite=cfg.OVERWRITE)
    if cfg.EPOCHS > 0:  # a cache-only run writes nothing into OUT_DIR; refuse now, clear once the settings hold
        artifacts.prepare_out_dir(cfg.OUT_DIR, artifacts.CLASSIFIER_OUTPUTS, **out_dir, clear=False)
    last = Path(cfg.OUT_DIR) / artifacts.LAST_CLASSIFIER
    resumed = (ct.resume_point(last, spec, cfg.LAYER4_STRIDE, {k: settings.config[k] for k in ct.SCHEDULE_KEYS},
                               moved_to=spec.get("data_root") if cfg.DATA_ROOT else "")  # '' : where it was read
               if cfg.RESUME else None)
    with main_rank_first(runtime):  # one download and one decode under DDP; the other ranks read the cache
        imageset = data.load_dataset(resumed["dataset"] if resumed else spec, cfg.CACHE_DIR, progress=runtime.is_main)
    if imageset.skipped:
        runtime.log(data.skipped_note(imageset))
    if cfg.EPOCHS == 0:  # cache-only run: decode the data, train nothing
        runtime.log(f"EPOCHS=0: {len(imageset)} images cached in {cfg.CACHE_DIR}; nothing trained")
        cleanup(runtime)
        return {"num_images": len(imageset), "skipped_images": imageset.skipped}

    if len(imageset.class_names) < 2:
        raise UserError(f"the data has {len(imageset.class_names)} class ({', '.join(imageset.class_names)}): "
                        f"a classifier needs at least 2 (one sub-folder per class)")
    model = SketchResNet(len(imageset.class_names), pretrained=cfg.PRETRAINED,
                         layer4_stride=cfg.LAYER4_STRIDE).to(runtime.device)
    if cfg.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    optimizer = ct.make_classifier_optimizer(model, cfg.LR, cfg.WEIGHT_DECAY, runtime.device)
    scaler = ct.make_grad_scaler(runtime.device, cfg.AMP)
    if resumed:
        state, split, prep = ct.restore(resumed, model, optimizer, scaler)
        runtime.log(state.resumed_note(last, cfg.EPOCHS))
        before = resumed.get("config", {}).get("SYNTHETIC_FRESH", False)
        if imageset.origins and bool(before) != bool(cfg.SYNTHETIC_FRESH):
            runtime.log(f"note: the run so far trained with SYNTHETIC_FRESH={before}; "
                        f"the remaining epochs use {cfg.SYNTHETIC_FRESH}")
    else:
        split, prep = ct.new_split(imageset, cfg.VAL_FRACTION, cfg.TEST_FRACTION, cfg.SEED, cfg.IMAGE_SIZE)
        state = TrainState(best=float("-inf"))
    ct.epoch_batches(len(split["train"]), settings, runtime.world_size)  # enough images for one step?
    # --overwrite removes the earlier run only now: a bad data root, stride, AMP mode or split loses nothing
    artifacts.prepare_out_dir(cfg.OUT_DIR, artifacts.CLASSIFIER_OUTPUTS, **out_dir, clear=runtime.is_main)
    barrier(runtime)
    if runtime.is_main:
        save_effective_config(cfg, cfg.OUT_DIR)
        artifacts.write_label_decoder(Path(cfg.OUT_DIR) / artifacts.LABEL_DECODER, imageset.class_names)
    if runtime.distributed:
        device_ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    result = ct.fit(model, optimizer, scaler, ct.ClassifierData(imageset, split, prep), state, settings, runtime)
    cleanup(runtime)
    return result


if __name__ == "__main__":
    exit_on_sigterm()
    keep_freed_memory()
    maybe_launch_torchrun(__file__, globals())
    run_cli(main, globals())
