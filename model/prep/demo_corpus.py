"""The built-in demo corpus: templated Chinese tasks a tiny T5 learns on a CPU in minutes.

Answers are a deterministic function of the prompt, so a tiny model can learn them; a few
wordings per task make it learn the task rather than one string. A prompt lives in one split
only (chosen by its hash), so validation rows are unseen prompts.
"""

from __future__ import annotations

import os
import random
import zlib
from typing import Iterator

import pyarrow as pa

from config import PRESETS
from model.errors import UserError
from model.prep.output import BATCH_ROWS, OUTPUT_SCHEMA, RowGroupWriter, check_outputs, open_parquet_outputs

_CAPITALS = {
    '中国': '北京', '日本': '东京', '韩国': '首尔', '法国': '巴黎', '英国': '伦敦', '德国': '柏林',
    '意大利': '罗马', '俄罗斯': '莫斯科', '美国': '华盛顿', '加拿大': '渥太华', '澳大利亚': '堪培拉',
    '埃及': '开罗', '印度': '新德里', '泰国': '曼谷', '西班牙': '马德里', '希腊': '雅典',
    '葡萄牙': '里斯本', '荷兰': '阿姆斯特丹', '瑞典': '斯德哥尔摩', '挪威': '奥斯陆', '芬兰': '赫尔辛基',
    '越南': '河内', '土耳其': '安卡拉', '古巴': '哈瓦那', '秘鲁': '利马', '肯尼亚': '内罗毕',
}
_SOUNDS = {
    '狗': '汪汪', '小狗': '汪汪', '猫': '喵喵', '小猫': '喵喵', '牛': '哞哞', '羊': '咩咩',
    '鸭子': '嘎嘎', '青蛙': '呱呱', '公鸡': '喔喔', '小鸡': '叽叽', '老鼠': '吱吱', '猪': '哼哼',
    '蜜蜂': '嗡嗡', '鸽子': '咕咕', '布谷鸟': '布谷',
}
_COLOURS = {
    '苹果': '红色', '番茄': '红色', '香蕉': '黄色', '柠檬': '黄色', '玉米': '黄色', '天空': '蓝色',
    '大海': '蓝色', '草': '绿色', '树叶': '绿色', '西瓜': '绿色', '雪': '白色', '牛奶': '白色',
    '云': '白色', '煤': '黑色', '乌鸦': '黑色', '橙子': '橙色', '胡萝卜': '橙色', '茄子': '紫色',
    '葡萄': '紫色',
}
_ANTONYM_PAIRS = ('大小', '多少', '高低', '长短', '上下', '左右', '前后', '快慢', '好坏', '冷热',
                  '黑白', '开关', '早晚', '新旧', '胖瘦', '强弱', '远近', '深浅', '轻重', '真假',
                  '买卖', '进出', '来去', '东西', '南北', '难易', '宽窄', '厚薄', '软硬', '对错')
_ANTONYMS = {**{p[0]: p[1] for p in _ANTONYM_PAIRS}, **{p[1]: p[0] for p in _ANTONYM_PAIRS}}
_FACT_TABLES = {'capital': _CAPITALS, 'sound': _SOUNDS, 'colour': _COLOURS, 'antonym': _ANTONYMS}
_FACT_KEYS = {task: sorted(table) for task, table in _FACT_TABLES.items()}
_WORDS = ('cat', 'dog', 'sun', 'red', 'blue', 'book', 'milk', 'fish', 'bird', 'tree', 'apple',
          'hello', 'world', 'happy', 'green', 'water', 'good', 'day', 'night', 'star', 'moon',
          'rain', 'snow', 'king', 'love', 'home', 'time', 'china', 'music', 'game', 'code', 'data')
_SUBJECTS = ('我', '你', '他', '她', '我们', '小明', '小红', '老师', '妈妈', '爸爸', '哥哥', '妹妹')
_TIMES = ('今天', '明天', '昨天', '早上', '晚上', '周末', '现在')
_ACTIVITIES = ('去学校', '看书', '吃饭', '喝水', '跑步', '唱歌', '写字', '买菜', '看电影', '打球',
               '学习中文', '画画', '回家', '睡觉', '做作业', '听音乐', '去公园', '洗衣服')
_WEATHER = ('很好', '不好', '很热', '很冷', '晴朗', '多云')
_REVERSE_CHARS = '春夏秋冬东南西北山水日月天地人口手花草鱼鸟风雨云星0123456789'

_TEMPLATES = {
    'add': ('计算：{a}+{b}=', '{a}加{b}等于多少？', '{a}+{b}等于几？', '请算：{a}加上{b}'),
    'sub': ('计算：{a}-{b}=', '{a}减{b}等于多少？', '{a}-{b}等于几？', '请算：{a}减去{b}'),
    'max': ('{a}和{b}哪个大？', '{a}与{b}相比哪个更大？', '{a}和{b}中较大的是？', '比较{a}和{b}，哪个大？'),
    'capital': ('{x}的首都是哪里？', '{x}的首都是？', '请问{x}的首都在哪个城市？', '说出{x}的首都。'),
    'sound': ('{x}怎么叫？', '{x}是怎么叫的？', '{x}的叫声是什么？', '{x}会发出什么声音？'),
    'colour': ('{x}是什么颜色的？', '{x}是什么颜色？', '请问{x}的颜色是？', '说出{x}的颜色。'),
    'antonym': ('{x}的反义词是什么？', '{x}的反义词是？', '请说出{x}的反义词。', '和{x}意思相反的字是？'),
    'copy': ('请重复：{x}', '重复一遍：{x}', '照抄这句话：{x}', '跟我说：{x}'),
    'reverse': ('倒序输出：{x}', '把“{x}”倒过来写', '请把{x}反过来', '{x}倒过来是什么？'),
    'upper': ('把{x}变成大写', '{x}的大写是什么？', '请写出{x}的大写字母', '大写：{x}'),
}
_TASK_WEIGHTS = {'add': 12, 'sub': 8, 'max': 8, 'capital': 12, 'sound': 10, 'colour': 10,
                 'antonym': 12, 'copy': 12, 'reverse': 10, 'upper': 6}

DEMO_EXAMPLES = (  # (prompt, expected answer), one per task; asked at the end of the demo run
    ('计算：23+45=', '68'),
    ('法国的首都是哪里？', '巴黎'),
    ('小狗怎么叫？', '汪汪'),
    ('香蕉是什么颜色的？', '黄色'),
    ('大的反义词是什么？', '小'),
    ('请重复：今天天气很好', '今天天气很好'),
    ('倒序输出：春夏秋冬', '冬秋夏春'),
    ('把cat变成大写', 'CAT'),
)


def demo_prompts() -> list[str]:
    """Fixed prompts, one per demo task, for the trainer to answer at the end of the demo."""
    return [prompt for prompt, _ in DEMO_EXAMPLES]


def build_demo_sample(rng: random.Random) -> tuple[str, str]:
    """One (prompt, response) of a randomly chosen task and wording."""
    task = rng.choices(list(_TASK_WEIGHTS), weights=list(_TASK_WEIGHTS.values()))[0]
    template = rng.choice(_TEMPLATES[task])
    if task in ('add', 'sub', 'max'):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        if task == 'sub':
            a, b = max(a, b), min(a, b)
        if task == 'max' and a == b:
            b = (a + 1) % 50
        answer = {'add': a + b, 'sub': a - b, 'max': max(a, b)}[task]
        return template.format(a=a, b=b), str(answer)
    if task in _FACT_TABLES:
        key = rng.choice(_FACT_KEYS[task])
        return template.format(x=key), _FACT_TABLES[task][key]
    if task == 'copy':
        text = _build_demo_sentence(rng)
        return template.format(x=text), text
    if task == 'reverse':
        text = ''.join(rng.choice(_REVERSE_CHARS) for _ in range(rng.randint(3, 6)))
        return template.format(x=text), text[::-1]
    word = rng.choice(_WORDS)
    return template.format(x=word), word.upper()


def _build_demo_sentence(rng: random.Random) -> str:
    when = rng.choice(_TIMES)
    if rng.random() < 0.25:
        return f'{when}天气{rng.choice(_WEATHER)}'
    return f'{rng.choice(_SUBJECTS)}{when}{rng.choice(_ACTIVITIES)}'


def should_go_to_valid(prompt: str) -> bool:
    # By prompt, not by draw: a prompt lives in one split only, so validation rows are
    # unseen prompts (another wording of a known fact, new numbers or sentences).
    return zlib.crc32(prompt.encode('utf-8')) % 10 == 0


Pairs = list[tuple[str, str]]


def iter_demo_rows(rows: int = 20000, seed: int = 42) -> Iterator[tuple[bool, str, str]]:
    """(goes to validation, prompt, response) until ~10% validation and the rest train are
    drawn: disjoint prompts, same task mix, nothing held in memory."""
    if rows < 10:
        raise UserError(f'--rows must be at least 10, got {rows}')
    n_valid = max(1, round(rows * 0.1))
    want = {False: rows - n_valid, True: n_valid}
    have = {False: 0, True: 0}
    rng = random.Random(seed)
    for _ in range(100 * rows):  # ~10 draws per valid row are needed; the bound only guards a bug
        prompt, response = build_demo_sample(rng)
        side = should_go_to_valid(prompt)
        if have[side] < want[side]:
            have[side] += 1
            yield side, prompt, response
        if have == want:
            return
    raise AssertionError('demo generator could not fill the validation split')


def build_demo_rows(rows: int = 20000, seed: int = 42) -> tuple[Pairs, Pairs]:
    """(train, valid) pairs of :func:`iter_demo_rows`, in memory (for small corpora and tests)."""
    out: dict[bool, Pairs] = {False: [], True: []}
    for side, prompt, response in iter_demo_rows(rows, seed):
        out[side].append((prompt, response))
    return out[False], out[True]


def write_demo(out_dir: str | None = None, rows: int = 20000, seed: int = 42) -> dict[str, int]:
    """Write train.parquet and valid.parquet to out_dir, streamed; returns {path: rows}."""
    out_dir = out_dir or os.path.dirname(PRESETS['demo']['train_file'])
    paths = {False: os.path.join(out_dir, 'train.parquet'), True: os.path.join(out_dir, 'valid.parquet')}
    if rows < 10:
        raise UserError(f'--rows must be at least 10, got {rows}')
    check_outputs({'out_dir (train.parquet)': paths[False], 'out_dir (valid.parquet)': paths[True]})
    pending: dict[bool, Pairs] = {False: [], True: []}

    def flush(side: bool, out: RowGroupWriter) -> None:
        pairs, pending[side] = pending[side], []
        out.write(pa.Table.from_arrays([pa.array([p for p, _ in pairs], pa.string()),
                                        pa.array([r for _, r in pairs], pa.string())], schema=OUTPUT_SCHEMA))

    with open_parquet_outputs([paths[False], paths[True]], 'demo') as (train, valid):
        writers = {False: train, True: valid}
        for side, prompt, response in iter_demo_rows(rows, seed):
            pending[side].append((prompt, response))
            if len(pending[side]) >= BATCH_ROWS:
                flush(side, writers[side])
        for side, out in writers.items():
            flush(side, out)
    return {paths[False]: train.rows_written, paths[True]: valid.rows_written}
