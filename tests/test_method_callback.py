"""RoseLoRA as a transformers.TrainerCallback inside an ordinary HF Trainer run."""
import pytest
import torch
from transformers import Trainer, TrainingArguments

from roselora_export.method import RoseLoraConfig, lora_pairs, prop1_sparsity_bound, sparsity, wrap_with_lora
from roselora_export.method.callback import RoseLoraCallback

from tiny_models import tiny_bert




class _Random(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_callback_prunes_bert_adapter_to_the_constraint(tmp_path):
    cfg = RoseLoraConfig(rank=4, targets=("query", "value"), tau=0.1, t_init=0.1, t_final=0.6, lr=1e-2,
                         clamp=None, early_stop_loss=None)
    model = wrap_with_lora(tiny_bert(), cfg, task_type="SEQ_CLS")
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4,
                             learning_rate=cfg.lr, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    callback = RoseLoraCallback(cfg)
    Trainer(model=model, args=args, train_dataset=_Random(), callbacks=[callback]).train()
    assert callback.pruner.t == 10
    assert (callback.pruner.t_init, callback.pruner.t_final) == (1, 6)  # fractions of max_steps
    pairs = lora_pairs(model)
    assert len(pairs) == 4
    for pair in pairs:
        A, B = pair.A.detach(), pair.B.detach()
        assert int((A != 0).sum(dim=1).max()) <= cfg.kept_count(A.shape[1])
        assert int((B != 0).sum(dim=0).max()) <= cfg.kept_count(B.shape[0])
        assert sparsity(B @ A) >= prop1_sparsity_bound(A, B) > 0
