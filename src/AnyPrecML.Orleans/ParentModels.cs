using System.Collections.Concurrent;
using AnyPrecML.MLNet;
using AnyPrecML.MLNet.Scoring;
using AnyPrecML.Quantization;
using Microsoft.ML;

namespace AnyPrecML.Orleans;

/// <summary>Where a silo finds models: job model names resolve under this directory.</summary>
public sealed class ScoringSiloOptions
{
    /// <summary>Directory holding any-precision model directories (a job's --model is a name under it, or an absolute path).</summary>
    public string ModelsDirectory { get; set; } = ".";
}

/// <summary>
/// The silo's open models: one any-precision parent per (model, engine, completion tokens), opened on first use and
/// held for the life of the silo. Its planes stay memory-mapped and every width is served from them (the worker
/// sets the width per shard), so a silo scoring 3-, 4- and 8-bit jobs holds one copy of the model.
/// </summary>
public sealed class ParentModels(ScoringSiloOptions options) : IDisposable
{
    /// <summary>An open parent: the `score` transformer over it, its content hash, and a lock that keeps one shard (one width) on it at a time.</summary>
    internal sealed record Parent(MLContext Ml, AnyPrecisionTransformer Transformer, string ContentSha256, SemaphoreSlim Gate);

    private readonly ConcurrentDictionary<(string Path, string Engine, int Completion), Lazy<Parent>> _open = new();

    /// <summary>The model directory a job's model name means on this silo.</summary>
    public string Resolve(string model) => Path.GetFullPath(Path.Combine(options.ModelsDirectory, model));

    internal Parent Get(string model, string engine, int completionTokens)
    {
        string path = Resolve(model);
        var key = (path, engine, completionTokens);
        var lazy = _open.GetOrAdd(key, k => new Lazy<Parent>(() => Open(k.Path, k.Engine, k.Completion)));
        try { return lazy.Value; }
        catch
        {
            _open.TryRemove(new(key, lazy)); // a model fixed on disk is retried by the next shard
            throw;
        }
    }

    private static Parent Open(string path, string engine, int completionTokens)
    {
        if (!Directory.Exists(path) || !Models.LlamaCheckpoint.IsAnyPrecision(path))
            throw new ArgumentException($"'{path}' is not an any-precision model directory on this silo.");
        var ml = new MLContext(seed: 0);
        var kind = engine == "reference" ? AnyPrecisionEngineKind.Reference : AnyPrecisionEngineKind.Onnx;
        var transformer = RowScorer.Open(ml, path, bits: null, completionTokens, kind);
        return new Parent(ml, transformer, AnyPrecisionModel.ContentHash(path), new SemaphoreSlim(1, 1));
    }

    /// <summary>Models opened so far (for the silo's log and tests).</summary>
    public int OpenCount => _open.Count(p => p.Value.IsValueCreated);

    /// <summary>Closes every open model.</summary>
    public void Dispose()
    {
        foreach (var p in _open.Values)
            if (p.IsValueCreated) p.Value.Transformer.Dispose();
        _open.Clear();
    }
}
