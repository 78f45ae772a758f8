using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;

namespace AnyPrecML.Tests;

/// <summary>
/// Engines opened at once in one process. Creating an ONNX Runtime session with the bitplane operator registers its
/// domain in a schema map the process shares; the first sessions of a process, created at once (a server's models,
/// test classes initialised in parallel), failed with "Trying to add a domain to DomainToVersion map, but the domain is
/// already exist" until session creation was serialised (<see cref="BitplaneOperator.CreateSession(byte[], Microsoft.ML.OnnxRuntime.SessionOptions)"/>).
/// </summary>
[TestClass]
public sealed class ConcurrentEngineTests
{
    /// <summary>Eight engines created at once all start and give the same logits (in this process, and as its first sessions in a child).</summary>
    [TestMethod]
    public void EnginesOpenedAtOnceAllStartAndAgree()
    {
        using var dir = TestData.NewTempDir();
        TestData.QuantizeStories260K(dir["ap"], new QuantizerOptions { SeedBits = 3, ParentBits = 4 });
        using var model = AnyPrecisionModel.Open(dir["ap"]);
        int[] prompt = [1, 403, 407, 261, 378];
        var outputs = new float[8][];
        Parallel.For(0, 8, new ParallelOptions { MaxDegreeOfParallelism = 8 }, i =>
        {
            using var engine = new OnnxEngine(model, new OnnxEngineOptions { Backend = new CpuBitplaneBackend(accuracy: KernelAccuracy.Float32) });
            outputs[i] = new float[model.Config.VocabSize * prompt.Length];
            engine.Forward(prompt, engine.CreateCache(), outputs[i]);
        });
        foreach (var o in outputs) CollectionAssert.AreEqual(outputs[0], o);
    }

    /// <summary>The test above in a process of its own, where its engines' sessions are the process's first.</summary>
    [TestMethod]
    public void EnginesOpenedAtOnceAsTheFirstSessionsOfAProcessAllStart()
    {
        var psi = new System.Diagnostics.ProcessStartInfo("dotnet", [typeof(ConcurrentEngineTests).Assembly.Location,
            "--filter", $"FullyQualifiedName={typeof(ConcurrentEngineTests).FullName}.{nameof(EnginesOpenedAtOnceAllStartAndAgree)}", "--output", "Detailed", "--no-ansi"])
        { RedirectStandardOutput = true, RedirectStandardError = true };
        using var child = System.Diagnostics.Process.Start(psi)!;
        var stderr = child.StandardError.ReadToEndAsync();
        string output = System.Text.RegularExpressions.Regex.Replace(child.StandardOutput.ReadToEnd(), "\u001B\\[[0-9;]*m", "");
        child.WaitForExit();
        Assert.AreEqual(0, child.ExitCode, $"{output}\n{stderr.Result}");
        StringAssert.Contains(output, $"passed {nameof(EnginesOpenedAtOnceAllStartAndAgree)}");
    }
}
