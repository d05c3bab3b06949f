from sdt_dist.model.gpt import GPTModel, GPTOutput
from sdt_dist.model.specs import student_layer_specs, teacher_layer_specs, transformer_config

__all__ = ["GPTModel", "GPTOutput", "student_layer_specs", "teacher_layer_specs", "transformer_config"]
