"""How tests/data/trainer_state.json was made: by transformers' own TrainerState.save_to_json
(transformers 5.24). Run with transformers installed to regenerate it:

    python tests/data/make_trainer_state.py
"""
from pathlib import Path

from transformers.trainer_callback import TrainerState, TrainerControl, EarlyStoppingCallback

es1 = EarlyStoppingCallback(early_stopping_patience=3, early_stopping_threshold=0.01)
es1.early_stopping_patience_counter = 1
es2 = EarlyStoppingCallback(early_stopping_patience=5)
es2.early_stopping_patience_counter = 2
control = TrainerControl(should_save=True)
log_history = []
for step in range(10, 70, 10):
    log_history.append({"epoch": step / 20, "grad_norm": 1.5 / step * 10, "learning_rate": 5e-05 * (1 - step / 60), "loss": 2.0 - step / 100, "step": step})
    if step % 20 == 0:
        log_history.append({"epoch": step / 20, "eval_loss": 1.9 - step / 120, "eval_accuracy": 0.5 + step / 200, "eval_runtime": 0.1234, "eval_samples_per_second": 810.4, "eval_steps_per_second": 101.3, "step": step})
log_history.append({"epoch": 3.0, "step": 60, "total_flos": 123456789.0, "train_loss": 1.65, "train_runtime": 12.5, "train_samples_per_second": 38.4, "train_steps_per_second": 4.8})
state = TrainerState(
    epoch=3.0, global_step=60, max_steps=60, logging_steps=10, eval_steps=20, save_steps=20,
    train_batch_size=8, num_train_epochs=3, num_input_tokens_seen=7680, total_flos=123456789.0,
    log_history=log_history, best_metric=1.4, best_global_step=60,
    best_model_checkpoint="out/checkpoint-60", is_hyper_param_search=False,
    trial_name=None, trial_params=None,
    stateful_callbacks=[es1, es2, control],
)
state.save_to_json(str(Path(__file__).with_name("trainer_state.json")))
