"""What every device computes and sends in one step: layout, collectives, the workload plan
and the step graph both engines walk; memory and fit checks; PIM work placement."""
