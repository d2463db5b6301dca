"""Forward models of the imaging physics: the ``LinearOperator`` base (``operators``), k-space
sampling masks (``masks``), MRI (``mri``) and CT (``ct``). Each lives here and nowhere else."""
