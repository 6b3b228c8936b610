"""`mtool release`: build, plan and collect the verified artifacts of a recipe."""
