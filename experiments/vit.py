"""Image classification: a small ViT (or ResNet) on scikit-learn's handwritten digits, or your images.

    python -m infra train --config experiments/vit.py --workdir runs/vit
    python -m infra train --config experiments/vit.py:convnet --workdir runs/convnet
    python -m infra train --config experiments/vit.py --workdir runs/mine \\
        --config.data.source=path/to/folder_or.npz --config.model.num_classes=5 \\
        --config.model.channels=3 --config.model.image_size=32 --config.model.patch_size=4

data.source: "digits" (1,797 real 8x8 images, 20% held out, stratified), a .npz with `images`
and `labels` (optionally `test_images` / `test_labels`), or a folder with one subfolder per class.
Images are resized to model.image_size and converted to model.channels. Eval accuracy is exact
over the whole held-out split.
"""

from infra.config import base_config
from infra.models import model_config

VARIANTS = {
    "digits": "ViT on sklearn digits (default), a few CPU minutes (results: docs/workloads.md)",
    "convnet": "small ResNet on sklearn digits",
    "smoke": "seconds on 8 CPU devices; what tests and `infra smoke` run",
}

# The ViT sees the digits bilinearly upsampled to 16x16 in 4x4 patches: each patch then mixes a
# 3x3 neighbourhood of original pixels, overlapping its neighbours (measured here: faster and more
# accurate than 2x2 patches of the raw 8x8, which carry 4 pixels each), and a 2-pixel shift is one
# original pixel.
MODELS = {
    "digits": dict(name="vit", image_size=16, patch_size=4, d_model=64, num_layers=4, num_heads=4,
                   mlp_dim=128, pool="mean"),
    "convnet": dict(name="convnet", image_size=8, widths=(32, 64), blocks_per_stage=1),
    "smoke": dict(name="vit", image_size=16, patch_size=4, d_model=32, num_layers=2, num_heads=2,
                  mlp_dim=64, pool="mean"),
}


def get_config(arg: str | None = None):
    variant = arg or "digits"
    c = base_config("image")  # data: the digits, shifted and noised (infra/tasks/image.py)
    c.model = model_config(**MODELS[variant], channels=1, num_classes=10)
    c.optim.update(weight_decay=0.1, b2=0.99)
    if variant == "smoke":
        c.train.update(steps=20, batch_size=32, log_every=5, eval_every=10)
        c.optim.update(lr=1e-2, warmup_steps=4)
        c.checkpoint.every = 10
    elif variant == "digits":
        c.train.update(steps=1500, batch_size=64, log_every=50, eval_every=250)
        c.optim.update(lr=2e-3, warmup_steps=100)
        c.checkpoint.every = 500
    else:  # convnet, on the raw 8x8 digits
        c.data.max_shift = 1
        c.train.update(steps=800, batch_size=64, log_every=50, eval_every=200)
        c.optim.update(lr=3e-3, warmup_steps=50)
        c.checkpoint.every = 400
    return c
