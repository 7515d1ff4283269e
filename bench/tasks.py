"""Held-out tasks for the learning benchmarks (bench_train.py, bench_recipe.py): Parquet files a
tiny T5 learns visibly on a CPU in minutes, each with a validation split of prompts never seen
in training, and a tokenizer trained on the train split. Deterministic: a (task, rows, seed)
always gives the same files.

- ``demo``: the built-in demo corpus (model/prep/demo_corpus.py; ten templated tasks, a prompt
  lives in one split only).
- ``numbers``: Chinese numerals and digits both ways (三百零五 <-> 305, 1 to 999) and the day or
  month after / before a given one, in four wordings each. Every number whose CRC is 0 mod 10
  (about 1 in 10) is held out in both directions, so the validation numbers are new to the model;
  for the weekdays and months the held-out rows are unseen (wording, key) combinations.

    .venv/bin/python bench/tasks.py numbers     # writes bench/out/tasks/numbers/, prints 5 rows of each split
"""

from __future__ import annotations

import os
import random
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'bench', 'out')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TASKS = ('demo', 'numbers')
ROWS = {'demo': 40000, 'numbers': 24000}  # train + valid rows written (about a tenth held out)
VOCAB = {'demo': 1200, 'numbers': 400}  # sentencepiece pieces (the demo preset's 1200 for demo)

_DIGITS = '零一二三四五六七八九'
_WEEKDAYS = ('一', '二', '三', '四', '五', '六', '日')
_TEMPLATES = {
    'to_digits': ('把{cn}写成阿拉伯数字', '{cn}用数字怎么写？', '数字：{cn}', '“{cn}”是多少？'),
    'to_chinese': ('{n}用汉字怎么写？', '把{n}写成中文', '读出数字{n}', '{n}的中文读法是？'),
    'next_day': ('星期{x}的后一天是星期几？', '星期{x}过去是星期几？', '今天星期{x}，明天星期几？', '星期{x}之后是？'),
    'prev_day': ('星期{x}的前一天是星期几？', '星期{x}之前是星期几？', '今天星期{x}，昨天星期几？', '星期{x}之前一天是？'),
    'next_month': ('{x}月的下一个月是几月？', '{x}月之后是几月？', '这个月是{x}月，下个月是几月？', '{x}月过去是？'),
}
_WEIGHTS = {'to_digits': 10, 'to_chinese': 10, 'next_day': 2, 'prev_day': 2, 'next_month': 2}


def chinese_number(n: int) -> str:
    """0..999 in Chinese numerals as written: 十一, 二十, 一百零五, 一百一十, 九百九十九."""
    if not 0 <= n <= 999:
        raise ValueError(n)
    if n < 10:
        return _DIGITS[n]
    hundreds, tens, ones = n // 100, n // 10 % 10, n % 10
    out = _DIGITS[hundreds] + '百' if hundreds else ''
    if tens:
        out += ('' if tens == 1 and not hundreds else _DIGITS[tens]) + '十'
    elif hundreds and ones:
        out += '零'
    return out + (_DIGITS[ones] if ones else '')


def _held_out(key: str) -> bool:
    return zlib.crc32(key.encode('utf-8')) % 10 == 0


def number_sample(rng: random.Random) -> tuple[str, str, bool]:
    """(prompt, answer, held out) of one drawn task and wording."""
    task = rng.choices(list(_WEIGHTS), weights=list(_WEIGHTS.values()))[0]
    template = rng.choice(_TEMPLATES[task])
    if task in ('to_digits', 'to_chinese'):
        n = rng.randint(1, 999)
        prompt = template.format(cn=chinese_number(n), n=n)
        return prompt, (str(n) if task == 'to_digits' else chinese_number(n)), _held_out(str(n))
    if task == 'next_month':
        m = rng.randint(1, 12)
        prompt = template.format(x=chinese_number(m))
        return prompt, f'{chinese_number(m % 12 + 1)}月', _held_out(prompt)
    i = rng.randrange(7)
    prompt = template.format(x=_WEEKDAYS[i])
    return prompt, '星期' + _WEEKDAYS[(i + (1 if task == 'next_day' else -1)) % 7], _held_out(prompt)


def number_rows(rows: int, seed: int = 42) -> tuple[list, list]:
    """(train, valid) pairs: about a tenth of the rows held out (drawn until both are full)."""
    rng = random.Random(seed)
    want = {False: rows - rows // 10, True: rows // 10}
    out: dict[bool, list] = {False: [], True: []}
    while any(len(out[k]) < want[k] for k in want):
        prompt, response, held = number_sample(rng)
        if len(out[held]) < want[held]:
            out[held].append((prompt, response))
    return out[False], out[True]


def task_files(task: str) -> dict[str, str]:
    """{'train', 'valid', 'tok'} of a task, written on first use under bench/out/tasks/<task>/."""
    import pyarrow as pa

    folder = os.path.join(OUT, 'tasks', task)
    paths = {'train': os.path.join(folder, 'train.parquet'), 'valid': os.path.join(folder, 'valid.parquet'),
             'tok': os.path.join(folder, 'tokenizer')}
    if not os.path.isfile(paths['valid']):
        os.makedirs(folder, exist_ok=True)
        if task == 'demo':
            from model.prep.demo_corpus import write_demo

            write_demo(folder, rows=ROWS[task], seed=42)
        else:  # the toolkit's own writer: marked, atomic, never over a file or through a link it did not make
            from model.prep.output import OUTPUT_SCHEMA, check_outputs, open_parquet_outputs

            names = ('train', 'valid')
            check_outputs({f'bench task {task} ({name}.parquet)': paths[name] for name in names})
            with open_parquet_outputs([paths[name] for name in names], 'bench tasks') as writers:
                for out, pairs in zip(writers, number_rows(ROWS[task])):
                    out.write(pa.Table.from_arrays([pa.array([p for p, _ in pairs], pa.string()),
                                                    pa.array([r for _, r in pairs], pa.string())], schema=OUTPUT_SCHEMA))
    if not os.path.isfile(os.path.join(paths['tok'], 'tokenizer.json')):
        from model.data.tokenizer import train_tokenizer

        train_tokenizer(paths['train'], paths['tok'], vocab_size=VOCAB[task], num_threads=1)
    return paths


def main() -> None:
    from model.data.files import iter_usable_rows

    task = sys.argv[1] if len(sys.argv) > 1 else 'numbers'
    paths = task_files(task)
    for split in ('train', 'valid'):
        rows = list(iter_usable_rows(paths[split], 10**9))
        print(f'{split}: {len(rows)} rows, {len(set(p for p, _ in rows))} distinct prompts')
        for p, r in rows[:5]:
            print(f'  {p}  ->  {r}')


if __name__ == '__main__':
    main()
