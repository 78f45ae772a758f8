using System.Text.Json;
using AnyPrecML.Kernels;

namespace AnyPrecML.Tests;

/// <summary>`anyprec bench gpu` (the check scripts/gpu-check.sh runs on a GPU) in its CPU-accelerator mode, and its refusal without CUDA.</summary>
[TestClass]
public sealed class BenchGpuTests
{
    [TestMethod]
    public void GpuCheckOnTheCpuAcceleratorPassesEveryWidthAndBatchAndMatchesCpuGreedyText()
    {
        var (code, output, err) = Cli.Run("bench", "gpu", "--accelerator", "cpu", "--quick", "--model", TestData.Stories260K, "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(output);
        var root = doc.RootElement;
        Assert.IsTrue(root.GetProperty("passed").GetBoolean(), output);

        var checks = root.GetProperty("checks").EnumerateArray().ToList();
        var covered = checks.Select(c => (c.GetProperty("bits").GetInt32(), c.GetProperty("m").GetInt32())).ToHashSet();
        foreach (int bits in Enumerable.Range(2, 7))
            foreach (int m in new[] { 1, 4, 8, 64 })
                Assert.Contains((bits, m), covered, $"b={bits} M={m} checked");
        foreach (var c in checks)
        {
            Assert.IsTrue(c.GetProperty("pass").GetBoolean(), c.ToString());
            Assert.IsLessThan(1e-5, c.GetProperty("worst_relative_error").GetDouble(), c.ToString());
        }

        var generation = root.GetProperty("generation").EnumerateArray().ToList();
        CollectionAssert.AreEquivalent(new[] { 3, 8 }, generation.Select(g => g.GetProperty("bits").GetInt32()).ToArray());
        foreach (var g in generation)
        {
            Assert.IsTrue(g.GetProperty("match").GetBoolean(), g.ToString());
            Assert.AreEqual(g.GetProperty("cpu_text").GetString(), g.GetProperty("text").GetString());
            Assert.IsGreaterThan(0, g.GetProperty("tokens").GetInt32());
        }

        Assert.IsGreaterThan(0, root.GetProperty("bandwidth_gb_per_s").GetDouble());
        var gemv = root.GetProperty("gemv").EnumerateArray().ToList();
        Assert.HasCount(18, gemv, "3 shapes × b = 3..8");
        foreach (var s in gemv) Assert.IsGreaterThan(0, s.GetProperty("ms").GetDouble(), s.ToString());
    }

    [TestMethod]
    public void CudaModeNeedsACudaDevice()
    {
        using var cuda = IlgpuBitplaneBackend.TryCreateCuda();
        if (cuda is null)
        {
            var (code, output, err) = Cli.Run("bench", "gpu", "--accelerator", "cuda", "--quick", "--model", TestData.Stories260K);
            Assert.AreEqual(2, code);
            Assert.AreEqual("", output);
            Assert.StartsWith("error: no CUDA device: ", err);
            Assert.AreEqual(1, err.TrimEnd().Split('\n').Length, err);
        }
        else
        {
            // A machine with a GPU runs the check itself instead.
            var (code, _, err) = Cli.Run("bench", "gpu", "--accelerator", "cuda", "--quick", "--model", TestData.Stories260K, "--json");
            Assert.AreEqual(0, code, err);
        }
    }
}
