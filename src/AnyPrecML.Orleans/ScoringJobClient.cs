using Microsoft.Extensions.Logging;

namespace AnyPrecML.Orleans;

/// <summary>Submits a job and follows it to the end, resubmitting when the silo hosting the job is lost (the job resumes from its state).</summary>
public static class ScoringJobClient
{
    /// <summary>Consecutive failed polls (half a second apart) before giving up on the cluster.</summary>
    private const int MaxFailedPolls = 120;

    /// <summary>Runs <paramref name="spec"/> to completion; reports progress after every poll; returns the final progress (Complete or Failed).</summary>
    public static async Task<ScoringJobProgress> RunAsync(IGrainFactory grains, ScoringJobSpec spec, Action<ScoringJobProgress>? progress = null,
        ILogger? log = null, CancellationToken ct = default)
    {
        var job = grains.GetGrain<IScoringJobGrain>(spec.Output);
        bool submitted = false;
        int failures = 0;
        while (true)
        {
            ct.ThrowIfCancellationRequested();
            ScoringJobProgress p;
            try
            {
                p = submitted ? await job.GetProgressAsync() : await job.SubmitAsync(spec);
                if (!p.Attached) p = await job.SubmitAsync(spec); // a fresh activation: the job's silo died; resume
                submitted = true;
                failures = 0;
            }
            catch (Exception e) when (e is not (ArgumentException or InvalidDataException or OperationCanceledException))
            {
                // The silo hosting the job died or a gateway dropped: resubmit once the cluster answers again.
                if (++failures >= MaxFailedPolls) throw new TimeoutException($"the cluster has not answered for {MaxFailedPolls / 2} s: {e.Message}", e);
                log?.LogWarning("cluster score: lost the job's silo ({Error}); resubmitting", e.Message);
                submitted = false;
                await Task.Delay(500, ct);
                continue;
            }
            progress?.Invoke(p);
            if (p.Status is ScoringJobStatus.Complete or ScoringJobStatus.Failed) return p;
            await Task.Delay(250, ct);
        }
    }
}
