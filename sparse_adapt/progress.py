"""Progress bars for the long steps (calibration, pruning, fine-tuning), when tqdm is installed."""


def progress_bar(iterable, desc: str, total=None, enabled: bool = True):
    from .distributed import rank

    if not enabled or rank() != 0:  # one bar per job, not per process
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)
