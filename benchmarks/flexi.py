"""Flexi-JEST costs: measured scoring and training FLOPs per example at each setting.

    python -m benchmarks.flexi [--model jest-vit-flexi-32] [--low-res 16] [--fraction 0.5]

Scoring: one forward pass of both towers per example, at the model's resolution and
at --low-res (the scoring setting of a Flexi-JEST learner). Training: one trainer
step per example (forward + backward + loss), all at full resolution, and with
--fraction of every batch at --low-res (FlexiViT-style multi-resolution training).
Measured with torch's FlopCounterMode, attention forced through the math kernel so
the counter sees it (some torch builds have no formula for fused CPU attention), and
beside the analytic counts of training/analytic_flops.py. The last line printed is
one JSON object.
"""
import argparse
import io
import json
import tempfile

import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from training import analytic_flops
from training import data as data_lib
from training import model as model_lib
from training import train as train_lib
from training.flops import count_flops


def _examples(n: int) -> list:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("L", (28, 28), (37 * i) % 256).save(buf, format="PNG")
        out.append(data_lib.Example(uid=f"u{i}", image=buf.getvalue(),
                                    caption=f"black slim fit t-shirt number {i}"))
    return out


def scoring_flops(cfg: dict, image_size: int, n: int = 8) -> int:
    net = model_lib.build_model(cfg, image_size=image_size).eval()
    images = torch.randn(n, 3, image_size, image_size)
    tokens = torch.randint(0, 1000, (n, cfg["text_cfg"]["context_length"]))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, flops = count_flops(lambda: (net.encode_image(images), net.encode_text(tokens)))
    return flops // n


def training_flops(model: str, *, batch_size: int, low_res: int = None,
                   fraction: float = 0.0) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = train_lib.Trainer(train_lib.TrainConfig(
            model=model, output=tmp, data=None, batch_size=batch_size, total_steps=1,
            stop_at_step=0, precision="fp32", device="cpu", low_res_size=low_res,
            low_res_fraction=fraction, tensorboard=False))
        with sdpa_kernel(SDPBackend.MATH):
            trainer.train_step(_examples(batch_size))
        return trainer.flops_per_example_train


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="jest-vit-flexi-32")
    p.add_argument("--low-res", type=int, default=16)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    _, cfg = model_lib.load_model_config(args.model)
    full = int(cfg["vision_cfg"]["image_size"])
    result = {
        "model": args.model, "image_size": full, "low_res": args.low_res,
        "low_res_fraction": args.fraction,
        "image_share_of_forward": analytic_flops.image_share(cfg),
        "scoring_flops_full": scoring_flops(cfg, full),
        "scoring_flops_low": scoring_flops(cfg, args.low_res),
        "analytic_scoring_flops_full": analytic_flops.forward_flops(cfg)["total"],
        "analytic_scoring_flops_low": analytic_flops.forward_flops(
            cfg, image_size=args.low_res)["total"],
        "training_flops_full": training_flops(args.model, batch_size=args.batch_size),
        "training_flops_mixed": training_flops(args.model, batch_size=args.batch_size,
                                               low_res=args.low_res, fraction=args.fraction),
    }
    result["scoring_low_over_full"] = result["scoring_flops_low"] / result["scoring_flops_full"]
    result["training_mixed_over_full"] = (result["training_flops_mixed"]
                                          / result["training_flops_full"])
    for key, value in result.items():
        print(f"{key}: {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
