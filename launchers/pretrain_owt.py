"""SelfDistil-T pretraining on OpenWebText (or any prepared corpus).

  deepspeed --hostfile hosts launchers/pretrain_owt.py --config launchers/configs/tiny.yaml --set train.max_steps=100
  DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launchers/pretrain_owt.py --config launchers/configs/tiny.yaml
"""

from sdt_dist.cli import train_main

if __name__ == "__main__":
    train_main()
