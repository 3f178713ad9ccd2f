"""Everything with weights and a forward: adaptor heads, losses, the distiller (student + heads),
teacher building and targets, target normalisers, σReparam, and input preprocessing."""
