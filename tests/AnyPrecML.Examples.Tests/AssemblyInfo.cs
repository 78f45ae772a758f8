// One at a time: a notebook runs with the process's working directory set to its folder.
[assembly: DoNotParallelize]
