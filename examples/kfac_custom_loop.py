"""K-FAC in a training loop of your own: the three lines that matter are marked (1)-(3).

    python examples/kfac_custom_loop.py --data path/to/cifar-10  # any dataset bigbatch reads
    python examples/kfac_custom_loop.py --synthetic --epochs 1   # no download, seconds

K-FAC sits beside a torch.optim optimizer: it rewrites the gradients of every Linear and Conv2d
layer into natural-gradient directions; momentum, weight decay and the LR stay the optimizer's.
"""

from __future__ import annotations

import argparse

import torch

from bigbatch import (
    BatchLoader,
    BatchMixer,
    KFACPreconditioner,
    LeNet5,
    channel_stats,
    load_dataset,
    mixed_cross_entropy,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", help="a CIFAR-10 archive/folder, image folder (.zip) or IDX folder"
    )
    parser.add_argument("--synthetic", action="store_true", help="small random dataset instead")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--mixup-alpha", type=float, default=0.0, help="0: no Mixup")
    parser.add_argument("--train-limit", type=int, default=0, help="0: the whole training set")
    args = parser.parse_args()
    if not args.synthetic and not args.data:
        parser.error("pass --data PATH or --synthetic")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.synthetic:
        ds = load_dataset("synthetic", None, train_limit=args.train_limit or 1024, test_limit=256)
    else:
        ds = load_dataset("auto", args.data, train_limit=args.train_limit or None)
    mean, std = channel_stats(ds.train_images)
    train = BatchLoader(
        ds.train_images, ds.train_labels, args.batch_size, mean=mean, std=std, shuffle=True
    )
    eval_batch = min(1000, ds.num_test)
    test = BatchLoader(
        ds.test_images, ds.test_labels, eval_batch, mean=mean, std=std, shuffle=False
    )

    model = LeNet5(ds.channels, ds.image_size, ds.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    # (1) One preconditioner per model; its options are KFACConfig's (bigbatch/config/schema.py).
    kfac = KFACPreconditioner(model, damping=1e-2, factor_interval=1, inverse_interval=10)
    mixer = BatchMixer(mixup_alpha=args.mixup_alpha, seed=0)

    for epoch in range(args.epochs):
        train.set_epoch(epoch)
        mixer.set_epoch(epoch)
        model.train()
        for x, y in train:
            x, y = x.to(device), y.to(device)
            x, targets = mixer(x, y)
            optimizer.zero_grad()
            loss = mixed_cross_entropy(model(x), targets)
            loss.backward()  # (2) K-FAC's hooks record the layers' inputs and output gradients
            kfac.step(lr=args.lr)  # (3) precondition the gradients, then step as usual
            optimizer.step()
        model.eval()
        hits = total = 0
        with torch.no_grad():
            for x, y in test:
                logits = model(x.to(device))
                hits += int((logits.argmax(1) == y.to(device)).sum())
                total += y.shape[0]
        print(f"epoch {epoch + 1}: last train loss {loss.item():.3f}, test acc {hits / total:.3f}")
    print({k: round(v, 3) for k, v in kfac.metrics().items()})  # time per part, health counters


if __name__ == "__main__":
    main()
