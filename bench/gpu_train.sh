#!/usr/bin/env bash
# GPU fine-tuning benchmark for `segnode train`, sized to finish in under 10 minutes on one
# modern CUDA GPU (A100/H100/H200 class). Runs unchanged on any CUDA box with segnode[dl]:
#
#   bench/gpu_train.sh [WORKDIR]          (default: a fresh temporary folder)
#
# 1. builds a dataset store of 24 synthetic abdominal CT phantoms (128x128x96, 1.5 mm; five
#    organs, TotalSegmentator numbering) and freezes it as Bench@1;
# 2. trains nnU-Net 3d_fullres from scratch (nnU-Net's own plans): EPOCHS x ITERATIONS
#    (default 12 x 100), or from TotalSegmentator's weights when $SEGNODE_WEIGHTS_DIR holds
#    Dataset297 (BASE=totalsegmentator);
# 3. evaluates on the patient-level test split and registers the model with its card;
# 4. prints the figures: wall time per stage, seconds per iteration, Dice/HD95 per organ,
#    seconds per scan, peak GPU memory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WORK=${1:-$(mktemp -d /tmp/segnode-gpu-train.XXXXXX)}
EPOCHS=${EPOCHS:-12}
ITERATIONS=${ITERATIONS:-100}
BASE=${BASE:-none}
CASES=${CASES:-24}
mkdir -p "$WORK"
echo "work folder: $WORK"
"$PY" -c "import torch,sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "no CUDA device: this benchmark is for a GPU (the CPU path is tested by tests/models/test_training_e2e.py)"; exit 2; }

t0=$(date +%s)
"$PY" - "$WORK" "$CASES" <<'PYEOF'
import json, sys
from pathlib import Path
import numpy as np, nibabel as nib
sys.path.insert(0, ".")
from tests.dl_fixtures import TS_LABELS, synthetic_case
from segnode.models.io_nifti import ras_affine, volume_to_nifti
work, n = Path(sys.argv[1]), int(sys.argv[2])
msd = work / "phantoms"
for sub in ("imagesTr", "labelsTr"):
    (msd / sub).mkdir(parents=True, exist_ok=True)
for i in range(n):
    volume, labels = synthetic_case(seed=7000 + i, shape=(96, 128, 128), spacing=(1.5, 1.5, 1.5))
    nib.save(volume_to_nifti(volume), msd / "imagesTr" / f"bench{i:03d}_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), ras_affine(volume)),
             msd / "labelsTr" / f"bench{i:03d}.nii.gz")
(msd / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **TS_LABELS}}))
(work / "secret.key").write_bytes(b"gpu-bench-secret-0123456789")
PYEOF
SEGNODE=("$PY" -m segnode.node.cli.main)
"${SEGNODE[@]}" dataset --store "$WORK/store" --secret-file "$WORK/secret.key" add "$WORK/phantoms" --dataset Bench
"${SEGNODE[@]}" dataset --store "$WORK/store" freeze Bench
t1=$(date +%s)

"${SEGNODE[@]}" -v train --dataset Bench@1 --store "$WORK/store" --base "$BASE" --device cuda \
  --epochs "$EPOCHS" --iterations "$ITERATIONS" --val-iterations 10 --processes 8 \
  --weights-dir "${SEGNODE_WEIGHTS_DIR:-$WORK/weights}" --workdir "$WORK/training" --name "Bench-$BASE/1" --force \
  2>&1 | tee "$WORK/train.log"
t2=$(date +%s)

CARD=$(ls "${SEGNODE_WEIGHTS_DIR:-$WORK/weights}"/finetuned/"Bench-$BASE"/1/model_card.json)
"$PY" - "$CARD" "$((t1 - t0))" "$((t2 - t1))" "$EPOCHS" "$ITERATIONS" <<'PYEOF'
import json, sys
card = json.load(open(sys.argv[1]))
data_s, train_s, epochs, iters = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
m = card["metrics"] or {}
print("\n=== segnode GPU training benchmark ===")
print(f"dataset build + store + freeze : {data_s} s")
print(f"segnode train (all stages)     : {train_s} s  ({train_s / 60:.1f} min)")
print(f"schedule                       : {epochs} epochs x {iters} iterations, patch {card['hyper_parameters']['patch_size']}, batch {card['hyper_parameters']['batch_size']}")
print(f"final train loss / EMA Dice    : {card['training']['final_train_loss']} / {card['training']['final_ema_pseudo_dice']}")
for o in m.get("organs", []):
    print(f"  {o['segment']:14} Dice {o['dice_mean']:.3f} ± {o['dice_sd']:.3f}   HD95 median {o['hd95_median_mm']:.1f} mm   (n={o['n']})")
if m:
    print(f"seconds per scan               : {m['seconds_per_case']:.2f} ({m['device']})")
    print(f"peak GPU memory (inference)    : {m['peak_gpu_mb']:.0f} MB")
PYEOF
grep -E "epoch [0-9]+/" "$WORK/train.log" | tail -3
