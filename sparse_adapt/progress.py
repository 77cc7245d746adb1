"""Progress bars for the long steps (calibration, pruning, fine-tuning), when tqdm is installed."""


def progress_bar(iterable, desc: str, total=None, enabled: bool = True):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)
