"""A hub name as --train_data / --datasets (hotpotqa, musique, ...): FlashRAG's copies of the datasets on the
Hugging Face hub (internet needed; the bundled data/ is used offline)."""

import utils

HUB_DATASET = "RUC-NLPIR/FlashRAG_datasets"


def load_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets
        return [dict(row) for row in datasets.load_dataset(HUB_DATASET, name, split=split)]
    except Exception as e:  # no internet, unknown split, ...
        raise utils.ReSearchError(f"could not load {HUB_DATASET}/{name} ({split}) from the hub (offline? use a "
                                  f"local jsonl): {e}") from e
