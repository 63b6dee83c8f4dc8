"""Glue to the libraries users load models with. Each submodule imports its library lazily,
so importing inductor_flex never imports them."""
