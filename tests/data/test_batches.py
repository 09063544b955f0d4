"""BatchLoader and channel_stats: coverage, determinism, sharding, normalization, crop/flip."""

import pytest
import torch

from bigbatch.data.batches import BatchLoader, channel_stats, crop_flip


def _data(n=103, c=3, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8), torch.arange(n)


def _loader(images, labels, batch_size, **kw):
    mean, std = channel_stats(images)
    return BatchLoader(images, labels, batch_size, mean=mean, std=std, **{"shuffle": True, **kw})


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_channel_stats_match_a_direct_float64_computation():
    images, _ = _data(300, c=2)
    images[:, 1] //= 3  # channels with different statistics
    mean, std = channel_stats(images, chunk=64)  # several chunks
    x = images.double() / 255
    torch.testing.assert_close(
        torch.tensor(mean, dtype=torch.float64), x.mean((0, 2, 3)), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor(std, dtype=torch.float64), x.std((0, 2, 3), correction=0), atol=1e-12, rtol=0
    )
    const = torch.full((5, 1, 3, 3), 7, dtype=torch.uint8)
    # A constant channel is centred, not divided by zero.
    assert channel_stats(const) == (
        [7 / 255],
        [1.0],
    )
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(images.float())


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_example_once_per_epoch(drop_last):
    images, labels = _data()
    loader = _loader(images, labels, 10, seed=3, drop_last=drop_last)
    assert len(loader) == (10 if drop_last else 11)
    batches = _epoch(loader, 0)
    assert len(batches) == len(loader)
    assert [y.shape[0] for _, y in batches] == [10] * 10 + ([] if drop_last else [3])
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == seen.numel() == (100 if drop_last else 103)
    for x, y in batches:  # each row is its own example's image
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 8, 6)
        ref = _loader(images, labels, 103, shuffle=False)
        torch.testing.assert_close(x, next(iter(ref))[0][y])


def test_same_seed_and_epoch_give_the_same_batches_and_others_differ():
    images, labels = _data()
    a = _loader(images, labels, 16, seed=7, augment=True)
    first = _epoch(a, 2)
    # A fresh loader, as after a restart.
    resumed = _loader(images, labels, 16, seed=7, augment=True)
    for (x1, y1), (x2, y2) in zip(first, _epoch(resumed, 2)):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
    assert not torch.equal(
        torch.cat([y for _, y in _epoch(a, 3)]), torch.cat([y for _, y in first])
    )
    other_seed = _loader(images, labels, 16, seed=8, augment=True)
    assert not torch.equal(
        torch.cat([y for _, y in _epoch(other_seed, 2)]), torch.cat([y for _, y in first])
    )
    again = _epoch(a, 2)  # iterating does not advance any hidden state
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, again))


def test_no_shuffle_keeps_order():
    images, labels = _data(20)
    batches = _epoch(_loader(images, labels, 8, shuffle=False), 5)
    assert torch.cat([y for _, y in batches]).tolist() == list(range(20))


@pytest.mark.parametrize("world_size, batch_size", [(2, 16), (2, 15), (3, 16), (4, 7)])
@pytest.mark.parametrize("augment", [False, True])
def test_rank_shards_concatenate_to_the_single_process_batch(world_size, batch_size, augment):
    images, labels = _data()
    kw = {"seed": 5, "augment": augment, "crop_padding": 2}
    single = _loader(images, labels, batch_size, **kw)
    ranks = [
        _loader(images, labels, batch_size, rank=r, world_size=world_size, **kw)
        for r in range(world_size)
    ]
    assert all(len(r) == len(single) for r in ranks)
    for epoch in (0, 4):
        whole = _epoch(single, epoch)
        parts = [_epoch(r, epoch) for r in ranks]
        assert all(len(p) == len(whole) for p in parts)
        for b, (x, y) in enumerate(whole):
            sizes = [p[b][1].shape[0] for p in parts]
            assert max(sizes) - min(sizes) <= 1  # split as evenly as possible
            assert torch.equal(torch.cat([p[b][1] for p in parts]), y)
            assert torch.equal(torch.cat([p[b][0] for p in parts]), x)  # same crops and flips too


def test_a_last_batch_smaller_than_the_ranks_is_dropped_on_every_rank():
    # 103 = 4 * 25 + 3: the last batch cannot give each of 4 ranks an example.
    images, labels = _data()
    single = _loader(images, labels, 25, seed=1)
    ranks = [_loader(images, labels, 25, seed=1, rank=r, world_size=4) for r in range(4)]
    assert len(single) == 5 and all(len(r) == 4 for r in ranks)
    whole, parts = _epoch(single, 0), [_epoch(r, 0) for r in ranks]
    assert all(len(p) == 4 and all(y.numel() > 0 for _, y in p) for p in parts)
    for b in range(4):
        assert torch.equal(torch.cat([p[b][1] for p in parts]), whole[b][1])
    # 3 examples for 3 ranks: kept.
    assert len(_loader(images, labels, 25, seed=1, rank=0, world_size=3)) == 5


def test_normalization_gives_zero_mean_unit_std():
    images, labels = _data(500)
    images[:, 2] = images[:, 2] // 4 + 100  # a channel far from mean 0.5 / std 0.29
    mean, std = channel_stats(images)
    loader = BatchLoader(images, labels, 128, mean=mean, std=std, shuffle=False)
    x = torch.cat([x for x, _ in loader])
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)
    ref = (images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(x.double(), ref, atol=1e-5, rtol=1e-5)


def test_crop_flip_by_hand():
    img = torch.arange(1, 13, dtype=torch.uint8).view(1, 1, 3, 4)  # rows 1-4, 5-8, 9-12
    centred = crop_flip(img, 1, torch.tensor([[1, 1]]), torch.tensor([False]))
    assert torch.equal(centred, img)
    # Window starts in the padding.
    up_left = crop_flip(img, 1, torch.tensor([[0, 0]]), torch.tensor([False]))
    assert up_left[0, 0].tolist() == [[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7]]
    down_right = crop_flip(img, 2, torch.tensor([[4, 3]]), torch.tensor([False]))
    assert down_right[0, 0].tolist() == [
        [10, 11, 12, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]  # last row, shifted left
    flipped = crop_flip(img, 1, torch.tensor([[1, 1]]), torch.tensor([True]))
    assert flipped[0, 0].tolist() == [[4, 3, 2, 1], [8, 7, 6, 5], [12, 11, 10, 9]]
    # Crop, then mirror the window.
    both = crop_flip(img, 1, torch.tensor([[2, 2]]), torch.tensor([True]))
    assert both[0, 0].tolist() == [[0, 8, 7, 6], [0, 12, 11, 10], [0, 0, 0, 0]]
    # Several images and channels at once, each with its own shift and flip.
    two = torch.stack([img[0], img[0] + 100]).expand(2, 2, 3, 4).contiguous()
    out = crop_flip(two, 1, torch.tensor([[0, 0], [2, 2]]), torch.tensor([False, True]))
    assert torch.equal(out[0, 1], up_left[0, 0]) and torch.equal(
        out[1, 0], both[0, 0] + (both[0, 0] > 0) * 100
    )


def test_augmented_batches_are_crops_and_flips_of_their_examples():
    images, labels = _data(40, c=2, h=5, w=4)
    pad = 2
    mean, std = [0.0, 0.0], [1.0, 1.0]  # identity normalization: x * 255 gives back the pixels
    loader = BatchLoader(
        images, labels, 16, mean=mean, std=std, shuffle=True, augment=True, crop_padding=pad, seed=1
    )
    padded = torch.nn.functional.pad(images, (pad,) * 4)

    def window(i, dy, dx, flip):
        win = padded[i, :, dy : dy + 5, dx : dx + 4]
        return win.flip(2) if flip else win

    seen_flip, seen_shift = set(), set()
    for x, y in _epoch(loader, 0):
        pixels = (x * 255).round().to(torch.uint8)
        for out, i in zip(pixels, y.tolist()):
            matches = [
                (dy, dx, f)
                for dy in range(2 * pad + 1)
                for dx in range(2 * pad + 1)
                for f in (False, True)
                if torch.equal(out, window(i, dy, dx, f))
            ]
            assert matches, f"example {i} is not a padded crop (or its mirror) of its image"
            seen_flip |= {m[2] for m in matches}
            seen_shift |= {m[:2] for m in matches}
    # Randomness is used, over many offsets.
    assert seen_flip == {False, True} and len(seen_shift) > 10
    plain = BatchLoader(images, labels, 16, mean=mean, std=std, shuffle=True, seed=1)
    for x, y in _epoch(plain, 0):  # without augment, exactly the images
        assert torch.equal((x * 255).round().to(torch.uint8), images[y])


def test_invalid_arguments_are_named():
    images, labels = _data(10)
    mean, std = channel_stats(images)
    kw = {"mean": mean, "std": std, "shuffle": True}
    with pytest.raises(
        ValueError, match="batch size 0 must be between 1 and the number of examples \\(10\\)"
    ):
        BatchLoader(images, labels, 0, **kw)
    with pytest.raises(ValueError, match="batch size 11 must be between 1"):
        BatchLoader(images, labels, 11, **kw)
    with pytest.raises(ValueError, match="batch size 3 is smaller than the 4 ranks"):
        BatchLoader(images, labels, 3, rank=0, world_size=4, **kw)
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        BatchLoader(images, labels, 4, rank=2, world_size=2, **kw)
    with pytest.raises(ValueError, match="one value per channel"):
        BatchLoader(images, labels, 4, mean=[0.5], std=[0.2], shuffle=False)
    with pytest.raises(ValueError, match="N labels"):
        BatchLoader(images, labels[:5], 4, **kw)
