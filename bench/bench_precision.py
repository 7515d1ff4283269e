"""fp32 vs bf16 autocast on this CPU: one forward+backward of a small T5 (not a test).

    PYTHONPATH=. python bench/bench_precision.py

Why the trainer falls back to fp32 on CPUs without AVX512-BF16/AMX: measured here
(2-core AVX2 CPU) 1.25 s/step in fp32 vs 26.3 s/step under bf16 autocast.
"""
import time

import torch

from config import T5ModelConfig
from model.net.chat_model import build_model
torch.manual_seed(0)
m = build_model(T5ModelConfig(d_model=256, num_heads=4, d_kv=64, d_ff=1024, num_layers=2, num_decoder_layers=2, dropout_rate=0.0), 8000)
x = torch.randint(3, 8000, (32, 64)); y = torch.randint(3, 8000, (32, 64))
def step(bf16):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
        loss = m(input_ids=x, labels=y).loss
    loss.backward()
for bf16 in (False, True):
    step(bf16); t = time.time()
    for _ in range(3): step(bf16)
    print('bf16' if bf16 else 'fp32', f'{(time.time()-t)/3:.3f} s/step')
