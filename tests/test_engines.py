"""Engines through accelerate: the config files, the launch checks, the SLURM script, states that
load no code, and gradient checkpointing. On these CPU machines FSDP and DeepSpeed cannot run
(accelerate's CPU mode silently runs DDP under an FSDP plugin), so their configs are checked as
accelerate itself loads and launches them; DDP runs for real on 2 gloo processes."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys

import pytest

import cli_runner
from conftest import ENV, ROOT, logged_losses, run_train, state_folders, tiny_flags

CONFIGS = sorted(glob.glob(os.path.join(ROOT, 'configs', 'accelerate', '*.yaml')))


def launch_env(config_file: str, *extra: str):
    """What `accelerate launch --config_file ... train_low_mem.py train` would run, built by
    accelerate's own parser and launch helpers, without launching."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(['--config_file', config_file, *extra, 'train_low_mem.py', 'train',
                                               '--use_large_config=True'])
    args, defaults, mixed_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (['mixed_precision'] if mixed_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ','.join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return args, env


def test_every_engine_config_loads_and_builds_its_launch():
    from accelerate.commands.config.config_args import load_config_from_file
    from transformers.models.t5.modeling_t5 import T5Block

    names = {os.path.basename(c) for c in CONFIGS}
    assert names == {'single_gpu.yaml', 'ddp_1node.yaml', 'ddp_2nodes.yaml', 'fsdp.yaml', 'deepspeed_zero2.yaml',
                     'deepspeed_zero3.yaml'}
    for path in CONFIGS:
        load_config_from_file(path)
    args, env = launch_env(os.path.join(ROOT, 'configs/accelerate/fsdp.yaml'))
    assert args.use_fsdp and env['FSDP_SHARDING_STRATEGY'] == 'FULL_SHARD'
    assert env['FSDP_AUTO_WRAP_POLICY'] == 'TRANSFORMER_BASED_WRAP'
    assert env['FSDP_TRANSFORMER_CLS_TO_WRAP'] == T5Block.__name__  # the class transformers' T5 is built of
    assert env['FSDP_STATE_DICT_TYPE'] == 'SHARDED_STATE_DICT'
    for stage in (2, 3):
        args, env = launch_env(os.path.join(ROOT, f'configs/accelerate/deepspeed_zero{stage}.yaml'))
        assert args.use_deepspeed and env['ACCELERATE_DEEPSPEED_ZERO_STAGE'] == str(stage)
    args, env = launch_env(os.path.join(ROOT, 'configs/accelerate/ddp_2nodes.yaml'), '--machine_rank', '1',
                           '--main_process_ip', 'node0')
    assert args.multi_gpu and (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 16)
    args, _ = launch_env(os.path.join(ROOT, 'configs/accelerate/ddp_1node.yaml'))
    assert args.multi_gpu and args.num_processes == 3
    args, env = launch_env(os.path.join(ROOT, 'configs/accelerate/single_gpu.yaml'))
    assert not (args.multi_gpu or args.use_fsdp or args.use_deepspeed) and env['ACCELERATE_MIXED_PRECISION'] == 'bf16'


def start_script(*flags, env=None, cwd=None, timeout=300):
    env = {**ENV, 'PATH': '/usr/bin:/bin', 'PYTHON': sys.executable, **(env or {})}
    return subprocess.run(['bash', os.path.join(ROOT, 'start_pretrain_large.sh'), *map(str, flags)], cwd=cwd or ROOT,
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)


def one_error(r):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), (r.returncode, r.stderr)
    return lines[0]


@pytest.mark.slow
def test_start_script_checks_the_engine_config_before_launching(tmp_path, data):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('distributed_type: MULTI_GPU\nnum_processes: [2\n')  # not YAML
    flags = tiny_flags(data, tmp_path / 'run', max_steps=2)
    ddp = os.path.join(ROOT, 'configs/accelerate/ddp_1node.yaml')
    two = os.path.join(ROOT, 'configs/accelerate/ddp_2nodes.yaml')
    cases = [
        ({'ACCELERATE_CONFIG': str(tmp_path / 'none.yaml')}, 'no such file'),
        ({'ACCELERATE_CONFIG': str(bad)}, 'accelerate cannot load it'),
        ({'ACCELERATE_CONFIG': ddp, 'NUM_GPUS': '2'}, '3 processes on this machine but 2 GPU(s)'),
        ({'ACCELERATE_CONFIG': ddp, 'NUM_GPUS': '0'}, 'needs GPUs and none was found'),
        ({'ACCELERATE_CONFIG': two, 'NUM_GPUS': '8'}, 'need the main machine\'s address'),
        ({'ACCELERATE_CONFIG': two, 'NUM_GPUS': '8', 'MAIN_PROCESS_IP': 'n0', 'MACHINE_RANK': '5'},
         'machine_rank=5 is outside 0..1'),
        ({'ACCELERATE_CONFIG': os.path.join(ROOT, 'configs/accelerate/fsdp.yaml'), 'NUM_GPUS': '2',
          'ACCELERATE_USE_CPU': '1'}, 'runs on GPUs only'),
    ]
    cases.append(({'NUM_GPUS': '3', 'CUDA_VISIBLE_DEVICES': ''}, 'NUM_GPUS=3 but 0 GPU(s) are visible'))
    import importlib.util

    if importlib.util.find_spec('deepspeed') is None:
        cases.append(({'ACCELERATE_CONFIG': os.path.join(ROOT, 'configs/accelerate/deepspeed_zero2.yaml'),
                       'NUM_GPUS': '2'}, "pip install -e '.[deepspeed]'"))
    procs = [(want, subprocess.Popen(['bash', os.path.join(ROOT, 'start_pretrain_large.sh'), *flags], cwd=ROOT,
                                     env={**ENV, 'PATH': '/usr/bin:/bin', 'PYTHON': sys.executable, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)) for env, want in cases]
    for want, proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        line = one_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
        assert want in line, (want, line)
    assert not os.path.exists(tmp_path / 'run')  # nothing started


@pytest.mark.parametrize('spelling', ['--dry_run=True', '--dry_run=TRUE', '--dry-run=yes'])
def test_start_script_passes_the_users_dry_run_through(tmp_path, data, spelling):
    # every spelling the trainer reads as true: a dry run the script missed would train for real
    flags = tiny_flags(data, tmp_path / 'run', max_steps=2)
    r = start_script(*flags, spelling, env={'NUM_GPUS': '2', 'ACCELERATE_USE_CPU': '1'})
    assert r.returncode == 0 and 'ready: data, tokenizer' in r.stdout and '2 process(es)' in r.stdout, \
        r.stderr[-2000:]
    assert not os.path.exists(tmp_path / 'run')  # a dry run starts nothing


@pytest.mark.parametrize('spelling, said', [
    (['--dry_run=maybe'], 'error: --dry_run=maybe: expected true or false for dry_run'),
    (['--dry_run=no', '--dry-run=0'], 'error: --dry_run is given twice; give it once')])
def test_start_script_refuses_a_dry_run_it_cannot_read_before_anything_runs(tmp_path, data, spelling, said):
    r = start_script(*tiny_flags(data, tmp_path / 'run', max_steps=2), *spelling, env={'NUM_GPUS': '0'})
    assert one_error(r) == said
    assert not os.path.exists(tmp_path / 'run')


@pytest.mark.slow
def test_start_script_runs_a_ddp_config_on_two_cpu_processes(tmp_path, data):
    config = tmp_path / 'ddp2.yaml'
    config.write_text(open(os.path.join(ROOT, 'configs/accelerate/ddp_1node.yaml')).read()
                      .replace('num_processes: 3', 'num_processes: 2').replace('mixed_precision: bf16', 'mixed_precision: "no"'))
    out = tmp_path / 'run'
    r = start_script(*tiny_flags(data, out, max_steps=4, batch_size_per_gpu=4),
                     env={'ACCELERATE_CONFIG': str(config), 'NUM_GPUS': '2', 'ACCELERATE_USE_CPU': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert '2 process(es) x 4 rows' in r.stdout  # the dry run counted the config's processes
    log = open(glob.glob(f'{out}/logs/*.log')[0], encoding='utf-8').read()
    assert '2 process(es)' in log and 'step 4/4' in log


def test_slurm_script_gives_each_node_its_rank_and_the_main_address(tmp_path):
    stubs = tmp_path / 'bin'
    stubs.mkdir()
    (stubs / 'scontrol').write_text('#!/bin/sh\nprintf "gpu-node-7\\ngpu-node-8\\n"\n')
    # srun runs the per-node command once per node, as SLURM would, with a start script stub
    (stubs / 'srun').write_text('#!/bin/bash\nshift\nfor node in 0 1; do SLURM_NODEID=$node "$@"; done\n')
    for stub in ('scontrol', 'srun'):
        os.chmod(stubs / stub, 0o755)
    work = tmp_path / 'job'
    os.makedirs(work / 'scripts')
    os.symlink(os.path.join(ROOT, 'scripts', 'env_checks.sh'), work / 'scripts' / 'env_checks.sh')
    (work / 'start_pretrain_large.sh').write_text(
        '#!/bin/bash\necho "node $MACHINE_RANK gpus $NUM_GPUS main $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT '
        'machines $NUM_MACHINES processes $NUM_PROCESSES config $ACCELERATE_CONFIG resume $RESUME args $*"\n')
    os.chmod(work / 'start_pretrain_large.sh', 0o755)
    env = {**ENV, 'PATH': f'{stubs}:/usr/bin:/bin', 'SLURM_SUBMIT_DIR': str(work), 'SLURM_NNODES': '2',
           'SLURM_GPUS_ON_NODE': '4', 'SLURM_JOB_NODELIST': 'gpu-node-[7-8]', 'SLURM_JOB_ID': '77'}
    r = subprocess.run(['bash', os.path.join(ROOT, 'scripts/slurm_2nodes.sbatch'), '--batch_size_per_gpu=24'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines == [f'node {n} gpus 4 main gpu-node-7:29500 machines 2 processes 8 config '
                     f'configs/accelerate/ddp_2nodes.yaml resume auto args --batch_size_per_gpu=24' for n in (0, 1)]
    # what the start script then hands to accelerate for node 1, checked by accelerate's parser
    facts = subprocess.run([sys.executable, '-m', 'model.train.launch_config', 'configs/accelerate/ddp_2nodes.yaml', '4'],
                           cwd=ROOT, capture_output=True, text=True,
                           env={**ENV, 'MACHINE_RANK': '1', 'MAIN_PROCESS_IP': 'gpu-node-7', 'NUM_MACHINES': '2',
                                'NUM_PROCESSES': '8'})
    assert facts.returncode == 0, facts.stderr
    launch_args = dict(line.split('=', 1) for line in facts.stdout.splitlines())['launch_args'].split()
    args, _ = launch_env(launch_args[1], *launch_args[2:])
    assert (args.num_machines, args.machine_rank, args.num_processes, args.main_process_ip) == (2, 1, 8, 'gpu-node-7')


def test_gradient_checkpointing_trains_the_same_losses(tmp_path, data):
    common = dict(max_steps=6, dropout_rate=0.0, save_steps=6)
    plain, ckpt = tmp_path / 'plain', tmp_path / 'ckpt'
    assert run_train(tiny_flags(data, plain, **common)).returncode == 0
    r = run_train(tiny_flags(data, ckpt, gradient_checkpointing=True, **common))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = logged_losses(plain), logged_losses(ckpt)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ('touch /tmp/chat_small_t5_code_ran',))


def test_loading_runs_no_code_from_a_handed_state_or_weights_file(tmp_path, data):
    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=4, save_steps=2)).returncode == 0
    state = f'{out}/state/{state_folders(f"{out}/state")[-1]}'
    assert {'model.safetensors', 'optimizer.bin', 'schedule.json', 'data_position.json', 'counters.json',
            'random_states_0.pkl', 'chat_small_t5.json'} <= set(os.listdir(state))
    assert not [n for n in os.listdir(state) if n.startswith('custom_checkpoint')]  # the run's parts: JSON
    if os.path.exists('/tmp/chat_small_t5_code_ran'):
        os.remove('/tmp/chat_small_t5_code_ran')
    # a pickle that runs a command, with the manifest updated to match (checksums are no signature)
    import torch

    evil = f'{state}/random_states_0.pkl'
    torch.save({'step': 0, 'random_state': _RunsCode()}, evil)
    marker = json.load(open(f'{state}/chat_small_t5.json'))
    marker['entries']['random_states_0.pkl'] = {'type': 'file', 'bytes': os.path.getsize(evil),
                                                    'sha256': hashlib.sha256(open(evil, 'rb').read()).hexdigest()}
    json.dump(marker, open(f'{state}/chat_small_t5.json', 'w'))
    r = run_train(tiny_flags(data, out, max_steps=6, save_steps=2), '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'holds more than tensors' in r.stderr and 'state-000000002' in r.stderr  # fell back to the previous
    assert not os.path.exists('/tmp/chat_small_t5_code_ran')
    # a weights file that needs unpickling: one line, nothing run
    bad = tmp_path / 'evil.bin'
    with open(bad, 'wb') as f:
        torch.save({'shared.weight': _RunsCode()}, f)
    g = cli_runner.run([sys.executable, 'train_low_mem.py', 'generate', f'--model_dir={bad}',
                        f'--tokenizer_dir={data["tok"]}', '--prompts=你好'], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert g.returncode == 2 and 'holds more than tensors' in g.stderr and 'Traceback' not in g.stderr, g.stderr
    assert not os.path.exists('/tmp/chat_small_t5_code_ran')
