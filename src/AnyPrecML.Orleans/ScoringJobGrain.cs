using AnyPrecML.MLNet.Scoring;
using AnyPrecML.Models;
using Microsoft.Extensions.Logging;
using Orleans.Runtime;

namespace AnyPrecML.Orleans;

/// <summary>A job's durable state (grain storage <see cref="ScoringCluster.StorageName"/>): what it is and which shards are on disk.</summary>
[GenerateSerializer]
public sealed class ScoringJobState
{
    [Id(0)] public ScoringJobSpec? Spec { get; set; }
    [Id(1)] public string? InputSha256 { get; set; }
    [Id(2)] public long Records { get; set; }
    [Id(3)] public List<ShardState> Shards { get; set; } = [];
    /// <summary>Content SHA-256 of the model the first shard was scored with; every later shard must match it.</summary>
    [Id(4)] public string? ModelSha256 { get; set; }
    [Id(5)] public bool Complete { get; set; }
}

/// <summary>One shard: records [FirstRecord, FirstRecord + Records) of the input.</summary>
[GenerateSerializer]
public sealed class ShardState
{
    [Id(0)] public long FirstRecord { get; set; }
    [Id(1)] public int Records { get; set; }
    /// <summary>Its output is renamed into place and counts as done.</summary>
    [Id(2)] public bool Done { get; set; }
    [Id(3)] public int Rejected { get; set; }
    [Id(4)] public string? ScoredBy { get; set; }
}

/// <summary>
/// Owns one scoring job, keyed by its output path. Plans the input into shards of <see cref="ScoringJobSpec.ShardRows"/>
/// records, hands one shard at a time to each active silo's worker, writes each result atomically as
/// &lt;output&gt;.shards/NNNNNN.jsonl, records it done in grain storage, and when all are done writes the output as the shards
/// in input order. A shard whose call fails (its silo died) goes back to the queue. A resubmitted job (a new activation
/// after its silo died, or after a restart, with storage in Redis) skips the shards its state records as done.
/// </summary>
/// <remarks>
/// The coordinator reads the input and ships records to workers, so workers need the model only; the input and
/// output paths must be reachable from whichever silo hosts the job (one machine, or a shared filesystem).
/// </remarks>
internal sealed class ScoringJobGrain(
    [PersistentState("job", ScoringCluster.StorageName)] IPersistentState<ScoringJobState> state,
    IClusterMembershipService membership,
    ILogger<ScoringJobGrain> log) : Grain, IScoringJobGrain
{
    /// <summary>Failed attempts after which a shard fails the job (a shard that no silo can score is not a silo failure).</summary>
    private const int MaxAttempts = 4;

    /// <summary>How long a silo whose call failed gets no shard, unless membership drops it first.</summary>
    private static readonly TimeSpan SuspectFor = TimeSpan.FromSeconds(20);

    private Task? _run;
    private ScoringJobStatus _status = ScoringJobStatus.Planning;
    private string? _error;
    private int _scoredNow, _alreadyDone, _retries, _workers;

    public Task<ScoringJobProgress> SubmitAsync(ScoringJobSpec spec)
    {
        if (spec.Output != this.GetPrimaryKeyString())
            throw new ArgumentException($"job {this.GetPrimaryKeyString()}: submitted with output {spec.Output}; a job is keyed by its full output path.");
        if (spec.ShardRows < 1) throw new ArgumentException($"--shard-rows {spec.ShardRows} must be at least 1.");
        if (state.State.Spec is { } then && Difference(then, spec) is { } diff)
            throw new ArgumentException($"{spec.Output}: this output belongs to a job with {diff}; use another --output for a different job.");
        if (_run is null || _run.IsCompleted)
        {
            // A new submission (or a finished job submitted again): checks the input, then scores what is not done.
            (_status, _error, _scoredNow, _retries) = (ScoringJobStatus.Planning, null, 0, 0);
            _run = RunAsync(spec);
        }
        return Task.FromResult(Progress());
    }

    public Task<ScoringJobProgress> GetProgressAsync() => Task.FromResult(Progress());

    private ScoringJobProgress Progress()
    {
        var s = state.State;
        var done = s.Shards.Where(x => x.Done).ToList();
        return new ScoringJobProgress
        {
            Status = _status, Shards = s.Shards.Count, ShardsDone = done.Count, ShardsScoredNow = _scoredNow, ShardsAlreadyDone = _alreadyDone,
            Records = s.Records, RecordsDone = done.Sum(x => (long)x.Records), Retries = _retries, Workers = _workers, Error = _error,
            Rejected = done.Sum(x => (long)x.Rejected), Attached = _run is not null,
            Silos = done.Select(x => x.ScoredBy).Distinct().Count(),
        };
    }

    /// <summary>The first setting that differs between the job on record and a resubmission (the input is compared by content later).</summary>
    private static string? Difference(ScoringJobSpec then, ScoringJobSpec now)
    {
        (string What, object Then, object Now)[] fields =
        [
            ("--model", then.Model, now.Model), ("--bits", then.Bits, now.Bits), ("--column", then.Column, now.Column),
            ("--completion-tokens", then.CompletionTokens, now.CompletionTokens), ("--engine", then.Engine, now.Engine),
            ("--shard-rows", then.ShardRows, now.ShardRows), ("--max-row-chars", then.MaxRowChars, now.MaxRowChars),
            ("--long-rows reject", then.RejectLongRows, now.RejectLongRows), ("--max-row-bytes", then.MaxRowBytes, now.MaxRowBytes),
        ];
        foreach (var (what, a, b) in fields)
            if (!Equals(a, b)) return $"{what} {a} (this submission has {b})";
        return null;
    }

    private async Task RunAsync(ScoringJobSpec spec)
    {
        try
        {
            var limits = new RowLimits(spec.MaxRowChars, spec.RejectLongRows, spec.MaxRowBytes);
            if (!File.Exists(spec.Input)) throw new FileNotFoundException($"{spec.Input}: no input file there (on the silo hosting the job).");
            string sha = await Task.Run(() => ScoreInput.Sha256(spec.Input));
            var s = state.State;
            if (s.Spec is null)
            {
                long records = await Task.Run(() => { ScoreInput.Check(spec.Input, spec.Column); return ScoreInput.Read(spec.Input, spec.Column, limits).LongCount(); });
                s.Spec = spec;
                s.InputSha256 = sha;
                s.Records = records;
                s.Shards = [];
                for (long first = 0; first < records; first += spec.ShardRows)
                    s.Shards.Add(new ShardState { FirstRecord = first, Records = (int)Math.Min(spec.ShardRows, records - first) });
                await SaveAsync();
            }
            else if (s.InputSha256 != sha)
                throw new InvalidDataException($"{spec.Input}: the input changed since this job started (SHA-256 {sha[..12]}…, the job has {s.InputSha256![..12]}…); use another --output for a new job.");
            if (s.Complete && !File.Exists(spec.Output))
            {
                // Finished once, but the output has since been removed (and with it the shard files): score it again.
                foreach (var shard in s.Shards) shard.Done = false;
                (s.Complete, s.ModelSha256) = (false, null);
                await SaveAsync();
            }
            _alreadyDone = s.Shards.Count(x => x.Done);
            _status = ScoringJobStatus.Running;
            if (!s.Complete)
            {
                await ScoreShardsAsync(spec, limits);
                await Task.Run(() => Assemble(spec, s));
                s.Complete = true;
                await SaveAsync();
            }
            _status = ScoringJobStatus.Complete;
            log.LogInformation("job {Job}: complete, {Scored} shards scored by this activation, {Skipped} already done", spec.Output, _scoredNow, _alreadyDone);
        }
        catch (Exception e)
        {
            (_status, _error) = (ScoringJobStatus.Failed, e.Message);
            log.LogError(e, "job {Job} failed", spec.Output);
        }
        finally { _workers = 0; }
    }

    private async Task ScoreShardsAsync(ScoringJobSpec spec, RowLimits limits)
    {
        var s = state.State;
        var pending = new SortedSet<int>(Enumerable.Range(0, s.Shards.Count).Where(k => !s.Shards[k].Done));
        if (pending.Count == 0) return;
        Directory.CreateDirectory(ShardDirectory(spec));
        using var input = new InputCursor(ScoreInput.Read(spec.Input, spec.Column, limits).GetEnumerator());
        var held = new Dictionary<int, IReadOnlyList<ShardRecord>>(); // records of shards handed out and not yet done
        var running = new Dictionary<Task<ShardResult>, (int Shard, SiloAddress Silo)>();
        var attempts = new Dictionary<int, int>();
        var suspect = new Dictionary<SiloAddress, DateTime>();
        while (pending.Count > 0 || running.Count > 0)
        {
            var busy = running.Values.Select(v => v.Silo).ToHashSet();
            foreach (var silo in ActiveSilos(suspect))
            {
                if (pending.Count == 0) break;
                if (busy.Contains(silo)) continue;
                int k = pending.Min;
                pending.Remove(k);
                if (!held.TryGetValue(k, out var records))
                    held[k] = records = await Task.Run(() => input.Take(s.Shards[k].FirstRecord, s.Shards[k].Records));
                var worker = GrainFactory.GetGrain<IScoringWorkerGrain>(silo.ToParsableString());
                var request = new ShardRequest
                {
                    Job = spec.Output, Shard = k, Model = spec.Model, Bits = spec.Bits, CompletionTokens = spec.CompletionTokens, Engine = spec.Engine, Records = records,
                };
                running[worker.ScoreAsync(request)] = (k, silo);
            }
            _workers = running.Count;
            if (running.Count == 0)
            {
                await Task.Delay(500); // no silo free to take a shard: wait for one to join or recover
                continue;
            }
            // Wake on a shard finishing, or after a while to hand work to silos that joined meanwhile.
            var first = await Task.WhenAny(running.Keys.Cast<Task>().Append(Task.Delay(TimeSpan.FromSeconds(2))));
            if (first is not Task<ShardResult> call) continue;
            running.Remove(call, out var job);
            DelayDeactivation(TimeSpan.FromMinutes(10)); // progress: keep the job active between the submitter's polls
            if (call.IsCompletedSuccessfully)
            {
                var result = call.Result;
                if (s.ModelSha256 is null) s.ModelSha256 = result.ModelSha256;
                else if (s.ModelSha256 != result.ModelSha256)
                    throw new InvalidDataException($"silo {result.Silo} scored shard {job.Shard} with a different model '{spec.Model}' (content SHA-256 {result.ModelSha256[..12]}…, the job's is {s.ModelSha256[..12]}…); every silo needs the same model files.");
                await Task.Run(() => WriteShard(spec, job.Shard, result));
                var shard = s.Shards[job.Shard];
                (shard.Done, shard.Rejected, shard.ScoredBy) = (true, result.ErrorLines.Count, result.Silo);
                await SaveAsync();
                held.Remove(job.Shard);
                _scoredNow++;
                continue;
            }
            var error = call.Exception!.InnerException ?? call.Exception;
            // A bad model name, a width the model lacks: every silo would fail the same way.
            if (error is ArgumentException or InvalidDataException or FileNotFoundException or DirectoryNotFoundException) throw error;
            int tries = attempts[job.Shard] = attempts.GetValueOrDefault(job.Shard) + 1;
            if (tries >= MaxAttempts)
                throw new InvalidOperationException($"shard {job.Shard} failed {tries} times; last on silo {job.Silo}: {error.Message}", error);
            _retries++;
            suspect[job.Silo] = DateTime.UtcNow + SuspectFor;
            pending.Add(job.Shard);
            log.LogWarning("job {Job}: shard {Shard} failed on silo {Silo} ({Error}); handed out again", spec.Output, job.Shard, job.Silo, error.Message);
        }
    }

    /// <summary>
    /// Writes the job state, again after a failure: the in-memory default keeps state in a storage grain, which dies
    /// with its silo; the write then goes to a fresh one (its version re-read first), so a lost silo does not fail the job.
    /// </summary>
    private async Task SaveAsync()
    {
        for (int attempt = 1; ; attempt++)
        {
            try
            {
                await state.WriteStateAsync();
                return;
            }
            catch (Exception e) when (attempt < 5)
            {
                log.LogWarning("job {Job}: writing its state failed ({Error}); writing again", this.GetPrimaryKeyString(), e.Message);
                await Task.Delay(TimeSpan.FromSeconds(attempt));
                var mine = state.State;
                try { await state.ReadStateAsync(); }
                catch (Exception) { } // the next write reports a storage that stays down
                state.State = mine;
            }
        }
    }

    /// <summary>Active members, in a stable order, less those whose call just failed (until membership drops them or the suspicion expires).</summary>
    private IEnumerable<SiloAddress> ActiveSilos(Dictionary<SiloAddress, DateTime> suspect)
    {
        var now = DateTime.UtcNow;
        return membership.CurrentSnapshot.Members.Values
            .Where(m => m.Status == SiloStatus.Active && !(suspect.TryGetValue(m.SiloAddress, out var until) && until > now))
            .Select(m => m.SiloAddress).OrderBy(a => a.ToParsableString(), StringComparer.Ordinal).ToList();
    }

    internal static string ShardDirectory(ScoringJobSpec spec) => spec.Output + ".shards";
    private static string ShardPath(ScoringJobSpec spec, int shard, string kind) => Path.Combine(ShardDirectory(spec), $"{shard:D6}.{kind}.jsonl");

    private static void WriteShard(ScoringJobSpec spec, int shard, ShardResult result)
    {
        AtomicFile.WriteText(ShardPath(spec, shard, "errors"), string.Concat(result.ErrorLines.Select(l => l + "\n")));
        AtomicFile.WriteText(ShardPath(spec, shard, "output"), string.Concat(result.OutputLines.Select(l => l + "\n")));
    }

    /// <summary>The output (and errors file, when a row was rejected) as the shards in input order, each written to a temporary name and renamed.</summary>
    private static void Assemble(ScoringJobSpec spec, ScoringJobState s)
    {
        void Concatenate(string path, string kind) => AtomicFile.Write(path, o =>
        {
            for (int k = 0; k < s.Shards.Count; k++)
            {
                string part = ShardPath(spec, k, kind);
                if (!File.Exists(part)) throw new FileNotFoundException($"{part}: shard {k} is recorded done but its file is missing; remove {spec.Output}.shards and resubmit with another --output.");
                using var i = File.OpenRead(part);
                i.CopyTo(o);
            }
        });
        string errors = spec.Output + ".errors.jsonl";
        if (s.Shards.Any(x => x.Rejected > 0)) Concatenate(errors, "errors");
        else File.Delete(errors);
        Concatenate(spec.Output, "output");
        Directory.Delete(ShardDirectory(spec), recursive: true);
    }

    /// <summary>The input read forward once: a shard's records are taken at its first record, skipping shards already done.</summary>
    private sealed class InputCursor(IEnumerator<InputRecord> records) : IDisposable
    {
        private long _position;

        public IReadOnlyList<ShardRecord> Take(long first, int count)
        {
            if (first < _position) throw new InvalidOperationException($"input cursor at record {_position} cannot go back to {first}.");
            var taken = new List<ShardRecord>(count);
            while (_position < first + count && records.MoveNext())
            {
                if (_position++ < first) continue;
                var r = records.Current;
                taken.Add(new ShardRecord { Index = r.Index, Line = r.Line, Text = r.Text, Problem = r.Problem, Truncated = r.Truncated });
            }
            if (taken.Count != count) throw new InvalidDataException($"the input ended at record {_position}; the job planned {first + count}.");
            return taken;
        }

        public void Dispose() => records.Dispose();
    }
}
