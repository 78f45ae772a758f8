using System.Diagnostics;
using AnyPrecML.MLNet.Scoring;
using Microsoft.Extensions.Logging;
using Orleans.Runtime;

namespace AnyPrecML.Orleans;

/// <summary>
/// The scoring worker of one silo: an ordinary grain keyed by its silo's address and pinned there
/// (<see cref="SiloPinnedPlacement"/>), one activation per silo.
/// </summary>
/// <remarks>
/// Why not a <c>[StatelessWorker]</c>: a stateless worker is always activated on the caller's silo, so a job grain
/// calling one would score every shard on its own silo and the rest of the cluster would idle. Pinning one worker
/// per silo lets the job choose the silo (one shard in flight per silo, the kernels use its cores), notice when that
/// silo dies (the call fails, the shard goes back to the queue), and never queue two shards behind one silo.
/// Scoring runs on the thread pool, not the grain scheduler; the grain is not reentrant, so a silo takes one shard at a
/// time, which also keeps the shared transformer at one width at a time.
/// </remarks>
[SiloPinnedPlacement]
internal sealed class ScoringWorkerGrain(ParentModels models, ILocalSiloDetails silo, ILogger<ScoringWorkerGrain> log) : Grain, IScoringWorkerGrain
{
    /// <summary>Shards this process has scored (all workers); the multi-process test reads the log line instead.</summary>
    internal static int ShardsScored;

    public async Task<ShardResult> ScoreAsync(ShardRequest request)
    {
        var result = await Task.Run(() => Score(request));
        Interlocked.Increment(ref ShardsScored);
        log.LogInformation("worker: scored shard {Shard} of {Job} ({Rows} records, {Bits} bits) in {Seconds:F2} s",
            request.Shard, request.Job, request.Records.Count, request.Bits, result.Seconds);
        return result;
    }

    private ShardResult Score(ShardRequest request)
    {
        var sw = Stopwatch.StartNew();
        var parent = models.Get(request.Model, request.Engine, request.CompletionTokens);
        var output = new List<string>(request.Records.Count);
        var errors = new List<string>();
        parent.Gate.Wait();
        try
        {
            parent.Transformer.Bits = request.Bits;
            var records = request.Records.Select(r => new InputRecord(r.Index, r.Line, r.Text, r.Problem, r.Truncated));
            foreach (var row in RowScorer.Score(parent.Ml, parent.Transformer, records))
                if (row.ErrorLine is not null) errors.Add(row.ErrorLine);
                else output.Add(row.OutputLine!);
        }
        finally { parent.Gate.Release(); }
        return new ShardResult
        {
            OutputLines = output, ErrorLines = errors, ModelSha256 = parent.ContentSha256, Silo = silo.SiloAddress.ToParsableString(), Seconds = sw.Elapsed.TotalSeconds,
        };
    }
}
