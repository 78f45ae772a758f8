namespace AnyPrecML.Orleans;

/// <summary>Everything that decides a cluster job's output: a resubmission with any of it changed is refused.</summary>
[GenerateSerializer, Immutable]
public sealed record ScoringJobSpec
{
    /// <summary>The input file (.jsonl, .csv, .tsv), at this path on the silo that hosts the job.</summary>
    [Id(0)] public required string Input { get; init; }
    /// <summary>The output file; also the job's key (one job per output).</summary>
    [Id(1)] public required string Output { get; init; }
    /// <summary>The model: a directory name under each silo's --models directory (or an absolute path).</summary>
    [Id(2)] public required string Model { get; init; }
    /// <summary>The width every shard is scored at.</summary>
    [Id(3)] public int Bits { get; init; }
    /// <summary>The text column.</summary>
    [Id(4)] public string Column { get; init; } = "text";
    /// <summary>Tokens generated per row (0: score only).</summary>
    [Id(5)] public int CompletionTokens { get; init; }
    /// <summary>"onnx" or "reference".</summary>
    [Id(6)] public string Engine { get; init; } = "onnx";
    /// <summary>Input records per shard.</summary>
    [Id(7)] public int ShardRows { get; init; } = 256;
    /// <summary>`score`'s row limits, with its defaults.</summary>
    [Id(8)] public int MaxRowChars { get; init; } = 100_000;
    /// <summary>Reject (true) or truncate (false) a row over <see cref="MaxRowChars"/>.</summary>
    [Id(9)] public bool RejectLongRows { get; init; }
    /// <summary>Largest raw record read, in bytes.</summary>
    [Id(10)] public int MaxRowBytes { get; init; } = 64 << 20;
}

/// <summary>A job's state as its submitter sees it.</summary>
[GenerateSerializer]
public enum ScoringJobStatus
{
    /// <summary>Hashing and counting the input.</summary>
    Planning,
    /// <summary>Shards are being scored.</summary>
    Running,
    /// <summary>The output is written.</summary>
    Complete,
    /// <summary>Stopped; <see cref="ScoringJobProgress.Error"/> says why.</summary>
    Failed,
}

/// <summary>Where a job stands.</summary>
[GenerateSerializer, Immutable]
public sealed record ScoringJobProgress
{
    [Id(0)] public ScoringJobStatus Status { get; init; }
    /// <summary>Shards in the job.</summary>
    [Id(1)] public int Shards { get; init; }
    /// <summary>Shards whose output is on disk.</summary>
    [Id(2)] public int ShardsDone { get; init; }
    /// <summary>Shards scored by this activation of the job (a resumed job skips the others).</summary>
    [Id(3)] public int ShardsScoredNow { get; init; }
    /// <summary>Shards found done when this activation started.</summary>
    [Id(4)] public int ShardsAlreadyDone { get; init; }
    /// <summary>Input records (rows and rejected rows) in the job.</summary>
    [Id(5)] public long Records { get; init; }
    /// <summary>Records in the shards done.</summary>
    [Id(6)] public long RecordsDone { get; init; }
    /// <summary>Shard attempts that failed and were handed out again (a silo died, a call failed).</summary>
    [Id(7)] public int Retries { get; init; }
    /// <summary>Silos scoring now.</summary>
    [Id(8)] public int Workers { get; init; }
    /// <summary>Why the job failed.</summary>
    [Id(9)] public string? Error { get; init; }
    /// <summary>Rows rejected into the errors file.</summary>
    [Id(10)] public long Rejected { get; init; }
    /// <summary>This activation runs (or ran) the job; false on a fresh activation (its silo died), which needs a resubmission.</summary>
    [Id(11)] public bool Attached { get; init; }
    /// <summary>Distinct silos that scored the shards done.</summary>
    [Id(12)] public int Silos { get; init; }
}

/// <summary>One input record as shipped to a worker (the coordinator reads the input; workers need no access to it).</summary>
[GenerateSerializer, Immutable]
public sealed record ShardRecord
{
    [Id(0)] public long Index { get; init; }
    [Id(1)] public long Line { get; init; }
    [Id(2)] public string? Text { get; init; }
    [Id(3)] public string? Problem { get; init; }
    [Id(4)] public bool Truncated { get; init; }
}

/// <summary>A shard handed to a worker: which job, which rows, at which width.</summary>
[GenerateSerializer, Immutable]
public sealed record ShardRequest
{
    [Id(0)] public required string Job { get; init; }
    [Id(1)] public int Shard { get; init; }
    [Id(2)] public required string Model { get; init; }
    [Id(3)] public int Bits { get; init; }
    [Id(4)] public int CompletionTokens { get; init; }
    [Id(5)] public required string Engine { get; init; }
    [Id(6)] public required IReadOnlyList<ShardRecord> Records { get; init; }
}

/// <summary>A scored shard: the output and errors lines exactly as `score` writes them, in record order.</summary>
[GenerateSerializer, Immutable]
public sealed record ShardResult
{
    [Id(0)] public required IReadOnlyList<string> OutputLines { get; init; }
    [Id(1)] public required IReadOnlyList<string> ErrorLines { get; init; }
    /// <summary>Content SHA-256 of the model the worker scored with (every shard of a job must agree).</summary>
    [Id(2)] public required string ModelSha256 { get; init; }
    /// <summary>The silo that scored it.</summary>
    [Id(3)] public required string Silo { get; init; }
    [Id(4)] public double Seconds { get; init; }
}

/// <summary>Scores shards on one silo, through the silo's one open parent per model.</summary>
public interface IScoringWorkerGrain : IGrainWithStringKey
{
    /// <summary>Scores the shard's records in order at the requested width.</summary>
    [ResponseTimeout("00:30:00")] // a shard takes as long as its rows; a dead silo fails the call when membership declares it dead
    Task<ShardResult> ScoreAsync(ShardRequest request);
}

/// <summary>One scoring job, keyed by its output path: shards, their state in grain storage, retries, the final output.</summary>
public interface IScoringJobGrain : IGrainWithStringKey
{
    /// <summary>Starts the job, or resumes it (skipping shards already done), or joins it if it is running; returns at once.</summary>
    Task<ScoringJobProgress> SubmitAsync(ScoringJobSpec spec);

    /// <summary>Where the job stands.</summary>
    [global::Orleans.Concurrency.AlwaysInterleave]
    Task<ScoringJobProgress> GetProgressAsync();
}
