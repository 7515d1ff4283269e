"""Checks of an accelerate config file before `start_pretrain_large.sh` launches it.

    python -m model.train.launch_config CONFIG_FILE VISIBLE_GPUS

prints ``key=value`` lines the start script reads (world_size, the launcher's arguments), or
one ``error: ...`` line and exits 2: a file accelerate cannot load, more processes per machine
than GPUs, a multi-node setup without a main address, a machine rank out of range, DeepSpeed
not installed. MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT, NUM_MACHINES and
NUM_PROCESSES in the environment override the file (a SLURM script sets them per node).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from model.errors import UserError

GPU_ENGINES = ('MULTI_GPU', 'FSDP', 'DEEPSPEED')


def check_launch_config(path: str, visible_gpus: int, use_cpu: bool = False) -> dict:
    """The launch facts of an accelerate config, or a UserError naming what is wrong."""
    if not os.path.isfile(path):
        raise UserError(f'ACCELERATE_CONFIG={path}: no such file (see configs/accelerate/)')
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        cfg = load_config_from_file(path)
    except Exception as e:  # noqa: BLE001 - whatever accelerate's loader refuses
        raise UserError(f'ACCELERATE_CONFIG={path}: accelerate cannot load it ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else "invalid"})') from None
    engine = str(getattr(cfg.distributed_type, 'value', cfg.distributed_type))
    if engine not in ('NO', 'MULTI_CPU', *GPU_ENGINES):
        raise UserError(f'ACCELERATE_CONFIG={path}: distributed_type {engine} is not one of NO, MULTI_GPU, FSDP, '
                        f'DEEPSPEED (see configs/accelerate/)')
    machines = int(os.environ.get('NUM_MACHINES') or cfg.num_machines or 1)
    processes = int(os.environ.get('NUM_PROCESSES') or cfg.num_processes or 1)
    rank = int(os.environ.get('MACHINE_RANK') or cfg.machine_rank or 0)
    ip = os.environ.get('MAIN_PROCESS_IP') or (cfg.main_process_ip or '')
    port = int(os.environ.get('MAIN_PROCESS_PORT') or cfg.main_process_port or 29500)
    if processes < 1 or machines < 1 or processes % machines:
        raise UserError(f'ACCELERATE_CONFIG={path}: num_processes={processes} is not a multiple of '
                        f'num_machines={machines} (it counts the processes of all machines)')
    per_machine = processes // machines
    needs_gpu = engine in GPU_ENGINES or (engine == 'NO' and not cfg.use_cpu)
    if needs_gpu and not use_cpu:
        if visible_gpus == 0:
            shown = 'one GPU (distributed_type NO)' if engine == 'NO' else engine
            raise UserError(f'ACCELERATE_CONFIG={path}: {shown} needs GPUs and none was found '
                            f'(nvidia-smi, CUDA_VISIBLE_DEVICES, NUM_GPUS)')
        if per_machine > visible_gpus:
            raise UserError(f'ACCELERATE_CONFIG={path}: {per_machine} processes on this machine but {visible_gpus} '
                            f'GPU(s) visible; set num_processes to {visible_gpus * machines} in the file')
    if engine in ('FSDP', 'DEEPSPEED') and (use_cpu or cfg.use_cpu):
        raise UserError(f'ACCELERATE_CONFIG={path}: {engine} runs on GPUs only (on a CPU accelerate would '
                        f'silently run DDP instead)')
    if engine == 'DEEPSPEED' and importlib.util.find_spec('deepspeed') is None:
        raise UserError(f"ACCELERATE_CONFIG={path}: DeepSpeed is not installed: pip install -e '.[deepspeed]'")
    if machines > 1:
        if not ip:
            raise UserError(f'ACCELERATE_CONFIG={path}: {machines} machines need the main machine\'s address: set '
                            f'main_process_ip in the file or MAIN_PROCESS_IP=... (the SLURM script does)')
        if not 0 <= rank < machines:
            raise UserError(f'ACCELERATE_CONFIG={path}: machine_rank={rank} is outside 0..{machines - 1}')
        if not 0 < port < 65536:
            raise UserError(f'ACCELERATE_CONFIG={path}: main_process_port={port} is not a port')
    args = ['--config_file', path, '--num_processes', str(processes), '--num_machines', str(machines)]
    if machines > 1:
        args += ['--machine_rank', str(rank), '--main_process_ip', ip, '--main_process_port', str(port)]
    return {'engine': engine, 'world_size': processes, 'machines': machines, 'machine_rank': rank,
            'launch_args': ' '.join(args)}


def main(argv: list[str]) -> int:
    try:
        facts = check_launch_config(argv[0], int(argv[1]),
                                    use_cpu=os.environ.get('ACCELERATE_USE_CPU', '').lower() in ('1', 'true', 'yes'))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for key, value in facts.items():
        print(f'{key}={value}')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
