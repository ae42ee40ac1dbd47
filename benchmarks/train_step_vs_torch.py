"""Train-step throughput of a registered model: jaxconv (jit) vs PyTorch CPU, side by side in one run.

    python benchmarks/train_step_vs_torch.py --model seed_cnn --batch 128

Both sides run the same architecture (PyTorch's is ``jaxconv.torch_twin`` of the model), SGD with momentum 0.9,
float32, on random data of the model's input shape. PyTorch runs NCHW and channels_last; the
better of the two is the reference. Contenders are timed by ``gradcheck.alternating_medians``
(rounds of 3 steps each, the first untimed) so that a noisy machine slows all of them alike.
"""
import argparse
import os

import jax
import optax
from jaxconv import compiler
from jaxconv.gradcheck import random_batch, alternating_medians, jitted_train_step, step_runner
from jaxconv.models import create_model
from jaxconv.torch_twin import torch_twin


def jax_step(model, batch, jit=compiler.jit):
    x, y = random_batch(model, batch, 0, jax.numpy.float32)
    return step_runner(*jitted_train_step(model, x, y, optax.sgd(0.01, momentum=0.9), jit=jit))


def torch_step(model, batch, channels_last):
    import torch
    net = torch_twin(model)
    x = torch.randn(batch, model.input_shape[-1], *model.input_shape[:-1])
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="seed_cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    import torch
    model = create_model(args.model)
    contenders = {"jaxconv (jit, NHWC)": jax_step(model, args.batch),
                  "jaxconv grad=manual": jax_step(create_model(args.model, grad="manual"), args.batch),
                  "jaxconv, XLA defaults": jax_step(model, args.batch, jit=jax.jit),
                  "torch NCHW": torch_step(model, args.batch, False)}
    if len(model.input_shape) == 3:
        contenders["torch channels_last"] = torch_step(model, args.batch, True)
    for run in contenders.values():  # compile / warm up
        for _ in range(3):
            run()
    med = alternating_medians(contenders, rounds=args.rounds)
    best_torch = min(v for k, v in med.items() if k.startswith("torch"))
    print(f"{args.model}, batch {args.batch}, float32, {jax.devices()[0].device_kind}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{args.rounds} rounds of 3 calls (first untimed), medians; "
          f"jaxconv's XLA options: {compiler.compiler_options() or 'none'}")
    print(f"{'contender':24s} {'ms/step':>9s} {'images/s':>10s} {'vs best torch':>14s}")
    for name, t in med.items():
        print(f"{name:24s} {t * 1e3:9.2f} {args.batch / t:10.0f} {best_torch / t:13.2f}x")


if __name__ == "__main__":
    main()
