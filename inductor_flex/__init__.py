"""inductor_flex: FlexAttention as a torch.compile Inductor plugin.

Importing the package registers the operators, their Dynamo capture and the Inductor
lowering, so plain ``torch.compile`` works; ``backend="inductor_flex"`` names it explicitly.
"""
